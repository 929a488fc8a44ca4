"""One knob rule (iqpir.inference.knobs): each knob is the flag, else the checkpoint's trained
value, else the model's default, and every path says which. The same restore through the CLI,
the app's HTTP API, the Python API and a video frame gives the same tensor (taken just before
each path encodes it) and records the same knobs, for each dtype."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from test_loader import tiny_run

import iqpir
from iqpir import io
from iqpir.cli import main
from iqpir.inference import photos, video
from iqpir.inference.files import DescribedModel
from iqpir.inference.knobs import Knob, resolve_knobs

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_VIDEO = importlib.util.find_spec("av") is not None
HAS_APP = all(importlib.util.find_spec(m) for m in ("fastapi", "httpx"))
HAS_INT8 = all(importlib.util.find_spec(m) for m in ("nncf", "openvino", "onnx"))

TRAINED = DescribedModel(None, kind="iqpir", quality=True, alpha=0.6, fidelity=True, default_fidelity=0.5,
                         trained={"alpha": 0.6, "fidelity": 0.5})
RELEASED = DescribedModel(None, kind="codeformer", quality=False, alpha=None, fidelity=True, default_fidelity=0.0)
NO_KNOBS = DescribedModel(None, kind="ESRGAN", refusals={"quality": "has no quality condition"})

# (model, flags) -> each knob's (value, source)
RULE = [
    (TRAINED, {}, {"quality": (1.0, "default"), "alpha": (0.6, "checkpoint"), "fidelity": (0.5, "checkpoint"),
                   "blend": (1.0, "default")}),
    (TRAINED, {"quality": 0.3, "alpha": 0.0, "fidelity": 0.0, "blend": 0.0},  # zero is a flag too
     {"quality": (0.3, "flag"), "alpha": (0.0, "flag"), "fidelity": (0.0, "flag"), "blend": (0.0, "flag")}),
    (TRAINED, {"fidelity": 0.9}, {"quality": (1.0, "default"), "alpha": (0.6, "checkpoint"), "fidelity": (0.9, "flag"),
                                  "blend": (1.0, "default")}),
    (RELEASED, {}, {"quality": (None, "default"), "alpha": (None, "default"), "fidelity": (0.0, "default"),
                    "blend": (1.0, "default")}),
    (NO_KNOBS, {"blend": 0.5}, {"quality": (None, "default"), "alpha": (None, "default"),
                                "fidelity": (None, "default"), "blend": (0.5, "flag")}),
]


@pytest.mark.parametrize("model, flags, want", RULE, ids=[f"{m.kind}-{sorted(f)}" for m, f, _ in RULE])
def test_flag_beats_the_checkpoint_which_beats_the_default(model, flags, want):
    got = resolve_knobs(model, **flags)
    assert got == {name: Knob(*v) for name, v in want.items()}


@pytest.mark.parametrize("model, flags, why", [
    (RELEASED, {"quality": 0.5}, "this codeformer model has no quality condition"),
    (RELEASED, {"alpha": 0.5}, "has one codebook"),
    (NO_KNOBS, {"fidelity": 0.5}, "has no CFT blocks"),
    (TRAINED, {"quality": 1.5}, r"quality must be in \[0, 1\]"),
    (TRAINED, {"blend": -0.1}, r"blend must be in \[0, 1\]"),
])
def test_flags_the_model_cannot_take_are_refused(model, flags, why):
    with pytest.raises(ValueError, match=why):
        resolve_knobs(model, **flags)


# --------------------------------------------------------------------------------------
# The same restore on every path
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The run, a one-frame clip, and its decoded frame as a PNG (so every path gets the same pixels)."""
    if not HAS_VIDEO:
        pytest.skip("needs the video extra: pip install 'iqpir[video]'")
    import av
    from test_video import write_clip

    root = tmp_path_factory.mktemp("paths")
    frame = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8).numpy()
    clip = root / "in" / "clip.mp4"
    write_clip(clip, [frame], crf=0)
    with av.open(str(clip)) as f:
        decoded = next(f.decode(video=0)).to_ndarray(format="rgb24")
    photo = root / "in" / "photo.png"
    io.write_image(photo, torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
    return {"run": tiny_run(root / "run"), "clip": clip, "photo": photo, "root": root}


def _cli_flags(flags):
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def restore_on(path: str, setup, dtype: str, flags: dict, monkeypatch, tmp_path) -> tuple[torch.Tensor, dict]:
    """(the restored image as the path hands it to its encoder, the knobs the path recorded)."""
    seen: list[torch.Tensor] = []
    run, out = setup["run"], tmp_path / f"out-{path}-{dtype}-{len(flags)}"
    common = ["--checkpoint", str(run), "--out", str(out), "--device", "cpu", "--dtype", dtype, *_cli_flags(flags)]
    if path == "python":
        restorer = iqpir.load(run, device="cpu", dtype=dtype, fidelity=flags.get("fidelity"))
        image = io.read_image(setup["photo"]).rgb
        return restorer.restore(image, **flags), restorer.settings(**flags)["knobs"]
    if path == "cli":
        write = photos.Finish.write
        monkeypatch.setattr(photos.Finish, "write", lambda self, t, img, r, *a, **k: seen.append(r) or write(self, t, img, r, *a, **k))
        assert main(["restore", str(setup["photo"]), *common]) == 0
    elif path == "video":
        encode = video._encode
        monkeypatch.setattr(video, "_encode", lambda o, v, r, f: seen.append(r) or encode(o, v, r, f))
        assert main(["restore", str(setup["clip"]), *common]) == 0
    else:
        from fastapi.testclient import TestClient

        import iqpir.app as app

        encode_png = app.encode_png
        monkeypatch.setattr(app, "encode_png", lambda rgb, *a: seen.append(rgb) or encode_png(rgb, *a))
        restorer = iqpir.load(run, device="cpu", dtype=dtype)
        with TestClient(app.create_app(restorer, face_pipeline=None)) as client:
            r = client.post("/api/restore", files={"image": ("p.png", setup["photo"].read_bytes(), "image/png")},
                            data={k: str(v) for k, v in flags.items()})
        assert r.status_code == 200, r.text
        [image] = seen
        return image, json.loads(r.headers["X-Knobs"])
    [image] = seen
    [entry] = json.loads((out / "restore.json").read_text())
    return image, entry["settings"]["knobs"]


DTYPES = ["float32", "auto", pytest.param("int8", marks=[
    pytest.mark.slow, pytest.mark.skipif(not HAS_INT8, reason="the int8 extra is not installed")])]
FLAGS = [{}, {"quality": 0.3, "alpha": 0.5, "fidelity": 0.2}]


@pytest.mark.parametrize("flags", FLAGS, ids=["no flags", "every knob"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_restore_on_every_path(dtype, flags, setup, monkeypatch, tmp_path):
    if not HAS_APP:
        pytest.skip("needs the app extra: pip install 'iqpir[app]'")
    got = {path: restore_on(path, setup, dtype, flags, monkeypatch, tmp_path)
           for path in ("python", "cli", "app", "video")}
    image, knobs = got["python"]
    for path, (other, recorded) in got.items():
        assert torch.equal(other, image), f"{path} restored other pixels than the Python API ({dtype}, {flags})"
        assert recorded == knobs, f"{path} recorded other knobs: {recorded} != {knobs}"
    sources = {name: k["from"] for name, k in knobs.items()}
    assert sources == ({"quality": "default", "alpha": "checkpoint", "fidelity": "checkpoint", "blend": "default"}
                       if not flags else {"quality": "flag", "alpha": "flag", "fidelity": "flag", "blend": "default"})
    if flags:  # the flags reached the network: not the restore without them
        plain, _ = restore_on("python", setup, dtype, {}, monkeypatch, tmp_path)
        assert not np.array_equal(plain.numpy(), image.numpy())
