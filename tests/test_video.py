"""Videos (issue 22): `iqpir restore clip.mp4 --out OUT/` restores every frame and keeps the rest.

Clips are made here with PyAV: a moving crop of a bundled photo with a 440 Hz AAC track, 2 s at
25 fps, and a variable-frame-rate one. The model is the small random plug-in U-Net (any size).
"""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from test_default_model import tiny_file

import iqpir
from iqpir.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("av") is None,
                                 reason="needs the video extra: pip install 'iqpir[video]'")]


def make_clip(path, pts: list[int], rate: int = 25, audio: bool = True, size=(64, 48)) -> None:
    """A moving 64x48 crop of skimage's astronaut at these pts (time base 1/rate), plus a sine."""
    import av
    import skimage.data

    photo = skimage.data.astronaut()[::4, ::4]
    w, h = size
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=rate)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.time_base = v.codec_context.time_base = __import__("fractions").Fraction(1, rate)
        a = out.add_stream("aac", rate=44100) if audio else None
        if a is not None:
            a.layout = "mono"
        for i, t in enumerate(pts):
            o = i % 60  # moving, and back
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[o: o + h, o: o + w]), format="rgb24")
            frame.pts = t
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        if a is not None:
            n = int(44100 * (pts[-1] + 1) / rate)
            wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)
            for k in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(wave[None, k:k + 1024], format="fltp", layout="mono")
                af.sample_rate, af.pts = 44100, k
                for p in a.encode(af):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)


def write_clip(path, frames, codec: str = "libx264", rate: int = 25, rotation: int = 0, crf: int | None = None,
               pix_fmt: str = "yuv420p") -> None:
    """(H, W, 3) uint8 frames -> a clip at `rate` frames per second, frame i at pts i."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        v = None
        for i, array in enumerate(frames):
            if v is None:
                v = out.add_stream(codec, rate=rate)
                v.height, v.width = array.shape[:2]
                v.pix_fmt = pix_fmt
                if crf is not None:
                    v.options = {"crf": str(crf)}
                if rotation:
                    v.set_display_rotation(rotation)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = i
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode():
            out.mux(p)


def frames_of(path) -> tuple[list, list[np.ndarray]]:
    import av

    with av.open(str(path)) as c:
        decoded = list(c.decode(video=0))
        return [f.pts * f.time_base for f in decoded], [f.to_ndarray(format="rgb24") for f in decoded]


def packets_of(path, kind: str) -> list[bytes]:
    import av

    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(**{kind: 0}) if p.size]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_clip(root / "clip.mp4", list(range(50)))
    make_clip(root / "vfr.mkv", [0, 1, 2, 4, 7, 8, 12, 13, 14, 20, 21, 30], audio=False)
    unet, _ = tiny_file(root)
    return root, unet


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_frame_restored_at_its_time_and_the_sound_copied(clips, tmp_path):
    root, unet = clips
    src = root / "clip.mp4"
    before = digest(src)
    assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path), "--device", "cpu",
                 "--dtype", "float32", "--crf", "0"]) == 0
    assert digest(src) == before, "the input changed"
    times_in, frames_in = frames_of(src)
    times_out, frames_out = frames_of(tmp_path / "clip.mp4")
    assert times_out == times_in and len(times_in) == 50
    assert packets_of(tmp_path / "clip.mp4", "audio") == packets_of(src, "audio")
    restorer = iqpir.load(unet, device="cpu", dtype="float32")
    luma = np.array([0.299, 0.587, 0.114])  # yuv420p keeps full-resolution luma (lossless at crf 0)
    for i in (0, 25, 49):
        want = restorer.restore(torch.from_numpy(frames_in[i]).permute(2, 0, 1).float() / 255)
        want = (want.permute(1, 2, 0).numpy() * 255).round() @ luma
        got = frames_out[i].astype(float) @ luma
        assert np.abs(got - want).mean() < 2.0, "the frame is not the model's restoration"
        assert np.abs(got - frames_in[i] @ luma).mean() > 5.0, "the frame was not restored"
    assert not list(tmp_path.glob(".*partial*")), "a partial file was left behind"


def test_variable_frame_rate_keeps_each_frame_time(clips, tmp_path):
    root, unet = clips
    assert main(["restore", str(root / "vfr.mkv"), "--checkpoint", str(unet), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    assert frames_of(tmp_path / "vfr.mkv")[0] == frames_of(root / "vfr.mkv")[0]


def test_bad_clips_get_one_line_and_leave_nothing(clips, tmp_path, capsys):
    root, unet = clips
    data = (root / "clip.mp4").read_bytes()
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "cut.mp4").write_bytes(data[: len(data) // 2])  # no index at all: cannot be opened
    make_clip(tmp_path / "whole.mkv", list(range(50)))
    mkv = (tmp_path / "whole.mkv").read_bytes()
    (bad / "cut.mkv").write_bytes(mkv[: len(mkv) // 2])  # streamable: half of it decodes, silently
    broken = bytearray(data)
    broken[2000:6000] = bytes(4000)
    (bad / "broken.mp4").write_bytes(bytes(broken))
    (bad / "noise.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    import av

    with av.open(str(bad / "sound.m4a"), "w") as out:  # audio only
        a = out.add_stream("aac", rate=8000)
        a.layout = "mono"
        for k in range(0, 8000, 1024):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 8000, k
            for p in a.encode(af):
                out.mux(p)
        for p in a.encode():
            out.mux(p)
    (bad / "sound.mp4").write_bytes((bad / "sound.m4a").read_bytes())
    out = tmp_path / "out"
    for name, why in (("cut.mp4", "cannot open"), ("cut.mkv", "cut short"), ("broken.mp4", "damaged"),
                      ("noise.mp4", "cannot open"), ("sound.mp4", "no video stream")):
        capsys.readouterr()
        assert main(["restore", str(bad / name), "--checkpoint", str(unet), "--out", str(out), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        failed = [line for line in err.splitlines() if "failed:" in line]
        assert len(failed) == 1 and why in failed[0], err
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    capsys.readouterr()
    assert main(["restore", str(root / "clip.mp4"), "--checkpoint", str(unet), "--out", str(out), "--device", "cpu",
                 "--max-frames", "10"]) == 1
    assert "over --max-frames 10" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_the_web_page_says_it_takes_photos_only(clips):
    from fastapi.testclient import TestClient

    from iqpir.app import create_app

    root, unet = clips
    restorer = iqpir.load(unet, device="cpu", dtype="float32")
    with TestClient(create_app(restorer, face_pipeline=None)) as client:
        r = client.post("/api/restore", files={"image": ("clip.mp4", (root / "clip.mp4").read_bytes(), "video/mp4")})
    assert r.status_code == 415 and "photos only" in r.json()["detail"]


def test_faces_in_a_clip(clips, tmp_path, capsys):
    """--faces on a clip: each frame through the photo path; the frames and their times kept; the
    faces restored are counted in the summary and in restore.json."""
    import json

    import matplotlib.cbook
    from PIL import Image

    _, unet = clips
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = np.asarray(Image.open(fh).convert("RGB").resize((160, 188), Image.LANCZOS))
    src = tmp_path / "in" / "face.mp4"
    canvases = []
    for i in range(6):
        canvas = np.full((208, 192, 3), 120, np.uint8)
        canvas[10:198, 16 + i: 176 + i] = face
        canvases.append(canvas)
    write_clip(src, canvases)
    assert main(["restore", str(src), "--faces", "--detector", "hog", "--checkpoint", str(unet), "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    times_in, frames_in = frames_of(src)
    times_out, frames_out = frames_of(tmp_path / "out" / "face.mp4")
    assert times_out == times_in
    entry = json.loads((tmp_path / "out" / "restore.json").read_text())[0]
    assert entry["frames"] == 6 and entry["frames_with_faces"] >= 5 and entry["faces"] >= 5, entry
    assert f"0 photos, 1 clip, {entry['faces']} faces restored" in capsys.readouterr().err
    assert np.abs(frames_out[3].astype(float) - frames_in[3]).mean() > 1.0, "no face was restored"
    # the background is kept as it is (no background model): the right-hand strip, far from the face
    assert np.abs(frames_out[3][:, 184:].astype(float) - frames_in[3][:, 184:]).max() <= 6


@pytest.mark.slow
def test_memory_stays_flat_over_a_30_s_clip(clips, tmp_path):
    """Peak RSS of a restore of a 3 s and a 30 s clip (each in its own process): the same within 30 MB."""
    import subprocess
    import sys

    _, unet = clips
    peaks = {}
    for seconds in (3, 30):
        src = tmp_path / f"c{seconds}.mp4"
        make_clip(src, list(range(25 * seconds)), audio=False)
        code = ("import resource, sys; from iqpir.cli import main; "
                f"rc = main(['restore', {str(src)!r}, '--checkpoint', {str(unet)!r}, '--out', {str(tmp_path / f'o{seconds}')!r}, "
                "'--device', 'cpu']); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[seconds] = int(done.stdout.split()[-1]) / 1024  # MB
    print(f"peak RSS: {peaks}")
    assert peaks[30] - peaks[3] < 30, peaks


def test_a_portrait_clip_keeps_its_rotation(clips, tmp_path):
    import av

    _, unet = clips
    src = tmp_path / "in" / "phone.mp4"
    write_clip(src, [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(5)], rotation=90)
    assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    with av.open(str(tmp_path / "out" / "phone.mp4")) as c:
        assert next(c.decode(video=0)).rotation == 90


@pytest.mark.parametrize("w, h", [(127, 95), (64, 47), (66, 48)])
def test_a_clip_keeps_its_width_and_height(clips, tmp_path, capsys, w, h):
    """4:2:0 needs even sides: an odd-sized clip is written 4:4:4 at its own size, and says so."""
    import av

    _, unet = clips
    src = tmp_path / "in" / "odd.mp4"
    write_clip(src, [np.full((h, w, 3), 40 * i, np.uint8) for i in range(3)], pix_fmt="yuv444p")
    assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    with av.open(str(tmp_path / "out" / "odd.mp4")) as c:
        stream = c.streams.video[0].codec_context
        assert (stream.width, stream.height) == (w, h)
        assert all(f.to_ndarray(format="rgb24").shape == (h, w, 3) for f in c.decode(video=0))
        odd = w % 2 or h % 2
        assert stream.pix_fmt == ("yuv444p" if odd else "yuv420p")
    assert ("has an odd side" in capsys.readouterr().err) == bool(odd)


def test_several_frames_per_forward_pass(clips, tmp_path, monkeypatch):
    from iqpir.inference.restorer import Restorer

    root, unet = clips
    seen = []
    run = Restorer._run
    monkeypatch.setattr(Restorer, "_run", lambda self, tiles, *a, **k: seen.append(tiles.shape[0]) or run(self, tiles, *a, **k))
    assert main(["restore", str(root / "clip.mp4"), "--checkpoint", str(unet), "--out", str(tmp_path), "--device", "cpu",
                 "--batch-size", "4"]) == 0
    assert seen == [4] * 12 + [2], seen  # 50 frames: twelve batches of 4 and one of 2


@pytest.mark.parametrize("suffix, codec, out_name", [(".mov", "libx264", "c.mov"), (".avi", "mpeg4", "c.mp4"),
                                                      (".webm", "libvpx-vp9", "c.mp4")])
def test_each_container(clips, tmp_path, suffix, codec, out_name):
    """.mov comes back in its container (H.264), .avi and .webm as .mp4; frames and times kept."""

    _, unet = clips
    src = tmp_path / "in" / f"c{suffix}"
    write_clip(src, [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(8)], codec=codec)
    assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix != ".json") == [".iqpir-done.jsonl", out_name]
    assert frames_of(tmp_path / "out" / out_name)[0] == frames_of(src)[0]


def test_clip_frames_follow_blend_and_colour_and_video_flags_need_a_clip(clips, tmp_path, capsys):
    """--blend 0 gives the input's frames back, --grayscale grey frames; --crf without a clip is refused."""
    root, unet = clips
    common = ["restore", str(root / "clip.mp4"), "--checkpoint", str(unet), "--device", "cpu", "--crf", "0"]
    assert main([*common, "--blend", "0", "--out", str(tmp_path / "b0")]) == 0
    assert main([*common, "--grayscale", "--out", str(tmp_path / "grey")]) == 0
    luma = np.array([0.299, 0.587, 0.114])
    _, frames_in = frames_of(root / "clip.mp4")
    _, same = frames_of(tmp_path / "b0" / "clip.mp4")
    assert np.abs(same[10] @ luma - frames_in[10] @ luma).mean() < 2.0  # RGB -> yuv420p -> RGB rounding
    _, grey = frames_of(tmp_path / "grey" / "clip.mp4")
    assert np.abs(grey[10].astype(int) - grey[10].mean(axis=-1, keepdims=True)).max() <= 3
    photo = tmp_path / "in" / "p.png"
    photo.parent.mkdir()
    photo.write_bytes(b"")
    capsys.readouterr()
    assert main(["restore", str(photo), "--checkpoint", str(unet), "--crf", "20", "--out", str(tmp_path / "o")]) == 2
    assert "apply only to videos" in capsys.readouterr().err
