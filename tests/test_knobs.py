"""The knobs of a plug-in model (the packaged default model's kind) on every path that restores.

A small quality-conditioned U-Net file with random weights goes down each path: the library call,
`iqpir restore` (whole images), `--aligned`, `--faces`, the web app's POST /api/restore and an
exported ONNX graph. On each, a different `quality` changes the output and equals the library's
output at that quality (8-bit); `alpha` and `fidelity`, which this model lacks, are refused with
one line, never accepted and ignored.
"""

from __future__ import annotations

import importlib.util
import io as pyio

import numpy as np
import pytest
import torch
from PIL import Image
from test_default_model import tiny_file

import iqpir
from iqpir import io
from iqpir.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
PATHS = ["library", "cli", "aligned", "faces", "app", "onnx"]
REFUSED = {"alpha": "has no codebooks: --alpha", "fidelity": "has no CFT blocks: --fidelity"}
APP_REFUSED = {"alpha": "has no HQ+ codebook; leave 'alpha' out", "fidelity": "has no fidelity control"}


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    path, _ = tiny_file(folder)
    return path


def _photo(tmp_path, size=(40, 56)):
    path = tmp_path / "in" / "p.png"
    io.write_image(path, torch.rand(3, *size, generator=torch.Generator().manual_seed(1)))
    return path


def run(path: str, checkpoint, tmp_path, photo, **knobs) -> np.ndarray | str:
    """The restored pixels (H, W, 3) uint8, or the refusal's text."""
    flags = [x for k, v in knobs.items() for x in (f"--{k}", str(v))]
    out = tmp_path / f"out-{path}-{'-'.join(f'{k}{v}' for k, v in knobs.items())}"
    if path == "library":
        try:
            y = iqpir.load(checkpoint, device="cpu", dtype="float32").restore(io.load_rgb(photo), **knobs)
        except ValueError as exc:
            return str(exc)
        return io.to_uint8(y)
    if path in ("cli", "aligned", "faces", "onnx"):
        extra = {"cli": [], "onnx": [], "aligned": ["--aligned"], "faces": ["--faces", "--detector", "hog"]}[path]
        ckpt = checkpoint
        if path == "onnx":
            from iqpir.export import export

            ckpt = tmp_path / "unet.onnx"
            if not ckpt.exists():
                export(checkpoint, "onnx", ckpt)
        rc = main(["restore", str(photo), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", *extra,
                   *flags])
        if rc != 0:
            return "refused"
        return np.asarray(Image.open(out / photo.name).convert("RGB"))
    from fastapi.testclient import TestClient

    from iqpir.app import create_app

    restorer = iqpir.load(checkpoint, device="cpu", dtype="float32")
    with TestClient(create_app(restorer, face_pipeline=None)) as client:
        r = client.post("/api/restore", files={"image": ("p.png", photo.read_bytes(), "image/png")},
                        data={k: str(v) for k, v in knobs.items()})
    if r.status_code != 200:
        return r.text
    return np.asarray(Image.open(pyio.BytesIO(r.content)).convert("RGB"))


@pytest.mark.parametrize("path", PATHS)
def test_quality_reaches_the_output_on_every_path(path, unet, face_photo, tmp_path):
    if path == "onnx" and not HAS_ONNX:
        pytest.skip("needs the onnx extra: pip install 'iqpir[onnx]'")
    photo = face_photo if path == "faces" else _photo(tmp_path)
    lo, hi = run(path, unet, tmp_path, photo, quality=0.1), run(path, unet, tmp_path, photo, quality=0.9)
    assert isinstance(lo, np.ndarray) and isinstance(hi, np.ndarray)
    changed = (lo != hi).any(axis=-1).mean()
    assert changed > (0.02 if path == "faces" else 0.5), f"{path}: quality did not reach the output ({changed:.3f})"
    if path != "faces":  # a whole image: exactly the library's restoration at that quality
        want = run("library", unet, tmp_path, photo, quality=0.9)
        assert np.abs(hi.astype(int) - want.astype(int)).max() <= 1, path


@pytest.mark.parametrize("path", ["library", "cli", "aligned", "faces", "app"])
@pytest.mark.parametrize("knob", sorted(REFUSED))
def test_knobs_the_model_lacks_are_refused_on_every_path(path, knob, unet, face_photo, tmp_path, capsys):
    photo = face_photo if path == "faces" else _photo(tmp_path)
    got = run(path, unet, tmp_path, photo, **{knob: 0.5})
    assert isinstance(got, str), f"{path} accepted --{knob} for a model without it"
    text = capsys.readouterr().err if got == "refused" else got
    assert (APP_REFUSED if path == "app" else REFUSED)[knob] in text and len(text.strip().splitlines()) == 1, text
