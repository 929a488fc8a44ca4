"""Every option of `iqpir restore` on every path that restores (issue 25, item 1).

One table, `MATRIX`, says for each (option, path) what the docs promise: an effect at the output
(pixels, size, files, the engine that ran, the batches the model saw) or a one-line refusal. An
option is never accepted and ignored. The model is a tiny random IQPIR network with both
codebooks and CFT blocks, so that every knob exists; the plug-in model's knobs (quality, and the
refusal of alpha and fidelity) are in test_knobs.py, the trained w as default in
test_inference_defaults.py.

Paths: `library` (load_restorer().restore), `tiles` (`iqpir restore`, whole or tiled images),
`aligned` (`--aligned`), `faces` (`--faces`), `app` and `app-faces` (POST /api/restore, faces off
and on), `graph` (`iqpir restore` of an exported ONNX file). "n/a" marks a cell that has no way
to pass the option (the library has no face flags: its face path is `iqpir.faces.restore_photo`).
"""

from __future__ import annotations

import importlib.util
import io as pyio
import json
from dataclasses import dataclass, field
from pathlib import Path

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
from iqpir.inference.restorer import Restorer
from iqpir.models import build_restorer

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_OPENVINO = HAS_ONNX and importlib.util.find_spec("openvino") is not None
PATHS = ("library", "tiles", "aligned", "faces", "app", "app-faces", "graph")

# option -> (value A, value B): the two settings each cell compares ("flag" = off / on).
VALUES = {
    "quality": (0.1, 0.9), "alpha": (0.0, 1.5), "fidelity": (0.0, 1.0),
    "dtype": ("float32", "bfloat16"), "engine": ("onnxruntime", "openvino"), "batch-size": (1, 3),
    "upscale": (1, 2), "only-center-face": ("flag", "flag"), "min-face": (0, 10_000), "draw-box": ("flag", "flag"),
    "save-faces": ("flag", "flag"), "bg-checkpoint": (None, "general"), "aligned": ("flag", "flag"),
    "blend": (1.0, 0.0), "grayscale": ("flag", "flag"), "color": ("flag", "flag"), "format": (None, "jpg"),
}

# option -> {path: what must happen}. "pixels": A and B give different outputs; "size": B's output
# is larger; "engine": the line restore prints names a different engine; "batches": the model
# sees batches of that size; "faces": restore.json counts fewer restored faces with B; "files": B
# writes the crops; "suffix": B's output has B's suffix; "refused": B is refused in one line and
# nothing is written. --color is tried on a grey picture (the model tints it; --color keeps that).
MATRIX: dict[str, dict[str, str]] = {
    "quality": dict.fromkeys(PATHS, "pixels"),
    "alpha": dict.fromkeys(PATHS, "pixels"),
    "fidelity": dict.fromkeys(PATHS, "pixels"),
    "dtype": {"library": "pixels", "tiles": "pixels", "aligned": "pixels", "faces": "pixels",
              "app": "pixels", "app-faces": "pixels", "graph": "refused"},
    "engine": {"library": "refused", "tiles": "refused", "aligned": "refused", "faces": "refused",
                "app": "n/a", "app-faces": "n/a", "graph": "engine"},
    "batch-size": {"library": "batches", "tiles": "batches", "aligned": "batches", "faces": "batches",
                   "app": "refused", "app-faces": "refused", "graph": "batches"},
    "upscale": {"library": "n/a", "tiles": "refused", "aligned": "refused", "faces": "size",
                "app": "size", "app-faces": "size", "graph": "refused"},
    # the face-only options: their effect with --faces, a one-line refusal elsewhere (the API has no such field)
    **{option: {"library": "n/a", "tiles": "refused", "aligned": "refused", "faces": what, "app": "refused",
                "app-faces": "refused", "graph": "refused"}
       for option, what in (("only-center-face", "faces"), ("min-face", "faces"), ("draw-box", "pixels"),
                            ("save-faces", "files"), ("bg-checkpoint", "pixels"))},
    "aligned": {"library": "n/a", "tiles": "pixels", "aligned": "n/a", "faces": "refused",
                "app": "refused", "app-faces": "refused", "graph": "pixels"},
    "blend": {"library": "n/a", "tiles": "pixels", "aligned": "pixels", "faces": "pixels",
              "app": "pixels", "app-faces": "pixels", "graph": "pixels"},
    **{option: {"library": "n/a", "tiles": what, "aligned": what, "faces": what, "app": "refused",
                "app-faces": "refused", "graph": what}
       for option, what in (("grayscale", "pixels"), ("color", "pixels"), ("format", "suffix"))},
}
CELLS = [(opt, path) for opt, row in MATRIX.items() for path, what in row.items() if what != "n/a"]


@dataclass
class Result:
    pixels: np.ndarray | None = None
    refusal: str | None = None
    faces: int | None = None  # restored faces (restore.json / X-Faces)
    files: list[str] = field(default_factory=list)
    line: str = ""  # the line restore prints: the engine and the values
    batches: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A stage-2 run (dual codebook, CFT blocks, 32 px), its ONNX graph, a general bg model."""
    root = tmp_path_factory.mktemp("models")
    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2"])
    cfg.model.cft_resolutions = [16, 32]
    torch.manual_seed(0)
    model = build_restorer(cfg.model).eval()
    with torch.no_grad():
        for p in model.cft.parameters():
            p.normal_(0.0, 0.2)
    run = root / "run"
    run.mkdir()
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    graph = None
    if HAS_ONNX:
        from iqpir.export import export

        graph = root / "model.onnx"
        export(run, "onnx", graph, fidelity=True)
    from test_default_model import tiny_file

    general, _ = tiny_file(root)
    return {"run": run, "graph": graph, "general": general}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40x56 random images and a photo with two faces (grace_hopper twice, side by side)."""
    import matplotlib.cbook

    root = tmp_path_factory.mktemp("photos")
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = Image.open(fh).convert("RGB").resize((240, 280), Image.LANCZOS)
    two = Image.new("RGB", (520, 320), (128, 128, 128))
    two.paste(face, (10, 20))
    two.paste(face, (270, 20))
    two.save(root / "two.png")
    (root / "grey").mkdir()
    two.convert("L").convert("RGB").save(root / "grey" / "two.png")
    for i, name in enumerate(("p", "q", "r")):
        io.write_image(root / f"{name}.png", torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(1 + i)))
    io.write_image(root / "grey" / "p.png", torch.rand(1, 40, 56, generator=torch.Generator().manual_seed(1)).expand(3, -1, -1))
    return {"plain": root / "p.png", "faces": root / "two.png", "more": [root / "q.png", root / "r.png"],
            "grey-plain": root / "grey" / "p.png", "grey-faces": root / "grey" / "two.png"}


def _batches(monkeypatch) -> list[int]:
    """The batch sizes the model sees from now on (a fresh record each call)."""
    seen: list[int] = []
    run = getattr(Restorer._run, "__wrapped__", Restorer._run)

    def spy(self, tiles, *args, **kw):
        seen.append(int(tiles.shape[0]))
        return run(self, tiles, *args, **kw)

    spy.__wrapped__ = run
    monkeypatch.setattr(Restorer, "_run", spy)
    return seen


def restore(path: str, opts: dict, models, photos, tmp_path, capsys, monkeypatch, grey: bool = False) -> Result:
    """Run one path with `opts` (CLI option names -> value; "flag" = a bare flag); grey: on a grey picture."""
    photo = photos[("grey-" if grey else "") + ("faces" if "faces" in path else "plain")]
    knobs = {k: v for k, v in opts.items() if k in ("quality", "alpha", "fidelity")}
    batches = _batches(monkeypatch)
    source = models["graph"] if path == "graph" else models["run"]
    if path == "library":
        try:
            r = iqpir.load(source, device="cpu", dtype=opts.get("dtype", "float32"),
                                    batch_size=int(opts.get("batch-size", 4)), engine=opts.get("engine", "auto"))
            y = r.restore(io.load_rgb(photo), **knobs)
        except ValueError as exc:
            return Result(refusal=str(exc))
        return Result(pixels=io.to_uint8(y), batches=batches)
    if path.startswith("app"):
        return _app(path, opts, source, photo, knobs, batches)
    out = tmp_path / f"out-{path}-{'-'.join(f'{k}{v}' for k, v in opts.items())}"
    flags = {"aligned": ["--aligned"], "faces": ["--faces", "--detector", "hog"]}.get(path, [])
    for k, v in opts.items():
        value = models["general"] if k == "bg-checkpoint" else v
        flags += [f"--{k}"] if v == "flag" else [] if v is None else [f"--{k}", str(value)]
    if "dtype" not in opts:
        flags += ["--dtype", "float32"]
    capsys.readouterr()
    inputs = [str(photo)]
    if path == "aligned":  # three files, so that batches can form
        inputs = [str(photo), *(str(p) for p in photos["more"])]
    rc = main(["restore", *inputs, "--checkpoint", str(source), "--out", str(out), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    if rc != 0:
        assert not (out / photo.name).exists(), f"{path}: refused, yet it wrote {out / photo.name}"
        return Result(refusal=err.strip())
    line = next((x for x in err.splitlines() if x.startswith("restoring with")), "")
    report = out / "restore.json"
    faces = None
    if report.exists():
        faces = sum(len(e.get("faces", [])) for e in json.loads(report.read_text()))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name != "restore.json" and not p.name.startswith("."))  # not the log
    # files from several folders are mirrored below the one they share (grey/p.png beside q.png)
    pixels = np.asarray(Image.open(next(out.rglob(photo.stem + ".*"))).convert("RGB"))
    return Result(pixels=pixels, faces=faces, files=files, line=line, batches=batches)


def _app(path, opts, source, photo, knobs, batches) -> Result:
    from fastapi.testclient import TestClient

    from iqpir.app import create_app
    from iqpir.faces import get_detector, restore_photo

    def pipeline(image, restore_faces, upscale=1):
        return restore_photo(image, restore_faces, detector=get_detector("hog"), upscale=upscale)

    # The app's dtype and batch size are the restorer's, chosen when it starts (`iqpir app --dtype`).
    restorer = iqpir.load(source, device="cpu", dtype=opts.get("dtype", "float32"))
    fields = {k: str(v) for k, v in knobs.items()}
    for k in ("upscale", "only-center-face", "min-face", "draw-box", "save-faces", "bg-checkpoint", "aligned",
              "batch-size", "blend", "grayscale", "color", "format"):
        if k in opts and opts[k] is not None:  # the API's name for each, if it had one
            fields[k.replace("-", "_")] = "true" if opts[k] == "flag" else str(opts[k])
    if path == "app-faces":
        fields["faces"] = "true"
    with TestClient(create_app(restorer, face_pipeline=pipeline if path == "app-faces" else None)) as client:
        r = client.post("/api/restore", files={"image": (photo.name, photo.read_bytes(), "image/png")}, data=fields)
    if r.status_code != 200:
        return Result(refusal=r.json()["detail"])
    faces = int(r.headers["X-Faces"]) if "X-Faces" in r.headers else None
    return Result(pixels=np.asarray(Image.open(pyio.BytesIO(r.content)).convert("RGB")), faces=faces, batches=batches)


@pytest.mark.parametrize("option, path", CELLS, ids=[f"{o}-{p}" for o, p in CELLS])
def test_every_option_on_every_path(option, path, models, photos, tmp_path, capsys, monkeypatch):
    what = MATRIX[option][path]
    if path == "graph" and models["graph"] is None:
        pytest.skip("needs the onnx extra: pip install 'iqpir[onnx]'")
    if option == "engine" and not HAS_OPENVINO:
        pytest.skip("needs the openvino extra: pip install 'iqpir[openvino]'")
    a, b = VALUES[option]
    grey = option == "color"
    if a == b == "flag" or a is None:  # without the option, then with it
        first = restore(path, {}, models, photos, tmp_path, capsys, monkeypatch, grey)
    else:
        first = restore(path, {option: a}, models, photos, tmp_path, capsys, monkeypatch, grey)
    second = restore(path, {option: b}, models, photos, tmp_path, capsys, monkeypatch, grey)

    if what == "refused":
        assert second.refusal, f"{path} accepted --{option} {b} and ignored it"
        assert len(second.refusal.splitlines()) == 1, second.refusal
        return
    assert first.refusal is None and second.refusal is None, (first.refusal, second.refusal)
    if what == "pixels":
        changed = (first.pixels != second.pixels).any(axis=-1).mean()
        least = 0.002 if "faces" in path or option == "draw-box" else 0.05 if option == "dtype" else 0.3
        assert changed > least, f"--{option} did not reach the output on {path} ({changed:.4f} of the pixels changed)"
    elif what == "size":
        assert second.pixels.shape[0] == 2 * first.pixels.shape[0], (first.pixels.shape, second.pixels.shape)
    elif what == "engine":
        assert a in first.line and b in second.line, (first.line, second.line)
        assert np.abs(first.pixels.astype(int) - second.pixels.astype(int)).max() <= 2
    elif what == "batches":
        assert first.batches and set(first.batches) == {1}, first.batches
        assert 1 < max(second.batches) <= b, second.batches
        # the same restoration (paste-back's float sums may round one level apart)
        assert np.abs(first.pixels.astype(int) - second.pixels.astype(int)).max() <= 1
    elif what == "faces":
        assert first.faces == 2 and second.faces < 2, (first.faces, second.faces)
    elif what == "files":
        assert first.files == ["two.png"] and len(second.files) == 1 + 2 * 2, second.files
    elif what == "suffix":
        assert [Path(f).suffix for f in first.files] == [".png"] * len(first.files), first.files
        assert [Path(f).suffix for f in second.files] == [f".{b}"] * len(second.files), second.files
