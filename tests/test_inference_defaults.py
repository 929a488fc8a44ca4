"""A checkpoint carries its inference defaults (issue 25): a stage-2 run trained at fidelity w
restores at that w on every path unless the user sets --fidelity, and each path shows the values
it used (the CLI's line, restore.json, /api/health, the app's X-Settings header, the graph's
metadata).

The bug this guards: `iqpir restore --checkpoint demo-output/stage2` ran at w = 0, skipping the CFT
blocks the demo had trained at w = 1 (and turning green trees red), while the report used w = 1.
"""

from __future__ import annotations

import importlib.util
import io as pyio
import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import SMALL_MODEL

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir import io
from iqpir.cli import main
from iqpir.models import build_restorer

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
PATHS = ["library", "cli", "aligned", "faces", "app", "app-faces", "onnx"]


def _run_folder(root, trained_w: float):
    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2", "model.adain=true"])
    cfg.model.cft_resolutions = [16, 32]
    cfg.train.fidelity = trained_w
    torch.manual_seed(0)
    model = build_restorer(cfg.model).eval()
    with torch.no_grad():  # CFT blocks that visibly change the output at w > 0
        for p in model.cft.parameters():
            p.normal_(0.0, 0.2)
    run = root / f"run-w{trained_w}"
    run.mkdir()
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return run


@pytest.fixture(scope="module")
def run_w1(tmp_path_factory):
    return _run_folder(tmp_path_factory.mktemp("w1"), 1.0)


def _photo(tmp_path):
    path = tmp_path / "in" / "p.png"
    io.write_image(path, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return path


def restore(path: str, run, tmp_path, photo, capsys, **knobs) -> tuple[np.ndarray, dict]:
    """(the restored pixels (H, W, 3) uint8, the settings the path says it used)."""
    flags = [x for k, v in knobs.items() for x in (f"--{k}", str(v))]
    out = tmp_path / f"out-{path}-{'-'.join(f'{k}{v}' for k, v in knobs.items())}"
    if path == "library":
        r = iqpir.load(run, device="cpu", dtype="float32")
        return io.to_uint8(r.restore(io.load_rgb(photo), **knobs)), r.settings(**knobs)
    if path in ("cli", "aligned", "faces", "onnx"):
        extra = {"cli": [], "onnx": [], "aligned": ["--aligned"], "faces": ["--faces", "--detector", "hog"]}[path]
        source = run
        if path == "onnx":
            from iqpir.export import export

            source = tmp_path / "model.onnx"
            if not source.exists():
                export(run, "onnx", source, fidelity=True)
        capsys.readouterr()
        rc = main(["restore", str(photo), "--checkpoint", str(source), "--out", str(out), "--device", "cpu",
                   "--dtype", "float32", *extra, *flags])
        assert rc == 0
        line = next(x for x in capsys.readouterr().err.splitlines() if "fidelity w =" in x)
        said = {"fidelity": float(line.split("fidelity w = ")[1].split()[0].rstrip(",")),
                "default": "(the checkpoint's; --fidelity sets it)" in line}
        if path == "faces":
            entry = json.loads((out / "restore.json").read_text())[0]
            assert entry["faces"], "no face found: the test photo lost its face"
            said["json"] = entry["settings"]["fidelity"]
            said["from"] = entry["settings"]["knobs"]["fidelity"]["from"]
        return np.asarray(Image.open(out / photo.name).convert("RGB")), said
    from fastapi.testclient import TestClient

    from iqpir.app import create_app
    from iqpir.faces import get_detector, restore_photo

    def pipeline(image, restore_faces, upscale=1):
        return restore_photo(image, restore_faces, detector=get_detector("hog"), upscale=upscale)

    restorer = iqpir.load(run, device="cpu", dtype="float32")
    fields = {k: str(v) for k, v in knobs.items()} | ({"faces": "true"} if path == "app-faces" else {})
    with TestClient(create_app(restorer, face_pipeline=pipeline if path == "app-faces" else None)) as client:
        health = client.get("/api/health").json()["model"]
        r = client.post("/api/restore", files={"image": ("p.png", photo.read_bytes(), "image/png")}, data=fields)
    if path == "app-faces":
        assert r.headers.get("X-Faces") not in (None, "0"), "no face found: the test photo lost its face"
    assert r.status_code == 200, r.text
    said = json.loads(r.headers["X-Settings"])
    said["health"] = health["default_fidelity"]
    said["adain"] = health["adain"]
    return np.asarray(Image.open(pyio.BytesIO(r.content)).convert("RGB")), said


@pytest.mark.parametrize("path", PATHS)
def test_a_checkpoint_restores_at_the_fidelity_it_was_trained_at(path, run_w1, face_photo, tmp_path, capsys):
    if path == "onnx" and not HAS_ONNX:
        pytest.skip("needs the onnx extra: pip install 'iqpir[onnx]'")
    photo = face_photo if "faces" in path else _photo(tmp_path)
    default, said = restore(path, run_w1, tmp_path, photo, capsys)
    at_1, said_1 = restore(path, run_w1, tmp_path, photo, capsys, fidelity=1.0)
    at_0, said_0 = restore(path, run_w1, tmp_path, photo, capsys, fidelity=0.0)
    assert np.abs(default.astype(int) - at_1.astype(int)).max() <= 1, f"{path}: the default is not the trained w = 1"
    changed = (at_0 != at_1).any(axis=-1).mean()
    assert changed > (0.005 if "faces" in path else 0.3), f"{path}: w = 0 and w = 1 look the same ({changed:.3f})"
    assert said["fidelity"] == 1.0 and said_0["fidelity"] == 0.0, (said, said_0)
    if path in ("cli", "aligned", "faces", "onnx"):
        assert said["default"] and not said_1["default"], "the line does not say where w came from"
    if path == "faces":
        assert said["json"] == 1.0 and said_0["json"] == 0.0
        assert said["from"] == "checkpoint" and said_0["from"] == "flag"
    if path.startswith("app"):
        assert said["health"] == 1.0 and said["adain"] is True


def test_a_run_trained_without_cft_restores_at_w0(tmp_path):
    run = _run_folder(tmp_path, 0.0)
    r = iqpir.load(run, device="cpu", dtype="float32")
    assert r.default_fidelity == 0.0 and r.settings()["fidelity"] == 0.0
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(r.restore(x), r.restore(x, fidelity=0.0))


def test_networks_described_without_a_training_record_restore_at_w0():
    """Official releases (described_network with no trained w) keep the IQPIR authors' w = 0."""
    from iqpir.inference.files import describe_network

    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2"])
    cfg.model.cft_resolutions = [16, 32]
    described = describe_network(build_restorer(cfg.model).eval(), 32, kind="codeformer")
    assert described.fidelity and described.default_fidelity == 0.0
