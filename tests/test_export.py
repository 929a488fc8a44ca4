"""Export to ONNX / OpenVINO: the graph computes what the torch network computes (same codes,
image within 1e-3), carries its metadata, and restores through load_restorer and the CLI.

ONNX Runtime and OpenVINO are extras (`pip install 'iqpir[onnx]'`, `'iqpir[openvino]'`); the
`dev` extra installs them, and the tests that need one are skipped, naming it, where it is
absent. The export of the paper-size network (95M parameters) is marked slow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import SMALL_MODEL

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.cli import main
from iqpir.export import InferenceGraph, export
from iqpir.inference.files import read_graph
from iqpir.models import build_restorer

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_OPENVINO = HAS_ONNX and importlib.util.find_spec("openvino") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra: pip install 'iqpir[onnx]'")
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs the openvino extra: pip install 'iqpir[openvino]'")
ASSETS = Path(__file__).parent / "assets" / "official"


def tiny_cfg(quality: str = "binned", dual: bool = True, cft: bool = True):
    cfg = C.load(preset="tiny", overrides=[
        *SMALL_MODEL, "train.stage=2",
        "model.adain=true", f"model.quality_embedding={quality}", f"model.dual_codebook={str(dual).lower()}",
    ])
    cfg.model.cft_resolutions = [16, 32] if cft else []
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A stage-2 run folder with a random tiny (32x32) IQPIR restorer that has CFT blocks."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_restorer(cfg.model).eval()
    run = tmp_path_factory.mktemp("run")
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return run, model


@pytest.mark.parametrize("quality, dual, cft", [("binned", True, True), ("continuous", True, False),
                                                ("none", False, True)])
def test_the_graph_is_the_network(quality, dual, cft):
    """InferenceGraph (what is exported) equals Restorer.forward exactly, in eager torch."""
    torch.manual_seed(1)
    model = build_restorer(tiny_cfg(quality, dual, cft).model).eval()
    x = torch.rand(3, 3, 32, 32)
    q = None if quality == "none" else torch.tensor([0.1, 0.75, 1.0])
    for w in ((0.0, 0.6) if cft else (0.0,)):
        graph = InferenceGraph(model, fidelity=w > 0)
        args = [x] + ([q] if q is not None else []) + ([torch.tensor(0.5)] if dual else [])
        args += [torch.tensor(w)] if w > 0 else []
        with torch.inference_mode():
            got = graph(*args)
            ref = model(x, q, alpha=0.5 if dual else None, fidelity=w)
        assert torch.equal(got[0], ref.restored) and torch.equal(got[1], ref.indices_common)
        assert (len(got) == 3) == dual and (not dual or torch.equal(got[2], ref.indices_hq))
    with pytest.raises(ValueError, match="no CFT blocks"):
        InferenceGraph(build_restorer(tiny_cfg(cft=False).model), fidelity=True)


def _compare(restorer, model, x, quality, alpha, fidelity):
    out = restorer.engine.outputs(x, quality, alpha, fidelity)
    with torch.inference_mode():
        ref = model(x, torch.full((x.shape[0],), quality), alpha=alpha, fidelity=fidelity)
    assert torch.equal(out["indices_common"], ref.indices_common)
    assert torch.equal(out["indices_hq"], ref.indices_hq)
    assert (out["restored"] - ref.restored).abs().max() < 1e-3


@needs_onnx
def test_onnx_export_matches_torch_and_restores(run_dir, tmp_path):
    run, model = run_dir
    info = export(run, "onnx", tmp_path / "m.onnx", fidelity=True)
    assert info.inputs == ["image", "quality", "alpha", "fidelity"]
    graph = read_graph(tmp_path / "m.onnx")
    assert (graph.image_size, graph.kind, graph.default_alpha) == (32, "iqpir", 0.8)
    restorer = iqpir.load(tmp_path / "m.onnx")
    assert restorer.engine.name == "onnxruntime" and restorer.supports_fidelity and restorer.model is None
    x = torch.rand(3, 3, 32, 32)  # batch 3: the exported batch axis is dynamic
    _compare(restorer, model, x, 0.9, None, 0.0)
    _compare(restorer, model, x, 0.3, 0.5, 0.7)
    big = restorer.restore(torch.rand(3, 50, 41), quality=0.8)  # tiles through the graph
    assert big.shape == (3, 50, 41) and 0 <= big.min() and big.max() <= 1


@needs_openvino
def test_openvino_export_matches_torch(run_dir, tmp_path, monkeypatch):
    """Through OpenVINO's own ONNX reader, never ov.convert_model: the converter's telemetry forks
    a process that, without internet, hangs on and keeps the program from exiting."""
    import openvino as ov

    def refused(*args, **kwargs):
        raise AssertionError("ov.convert_model called: it sends telemetry")

    monkeypatch.setattr(ov, "convert_model", refused)
    run, model = run_dir
    export(run, "openvino", tmp_path / "m.xml", fidelity=True)
    assert (tmp_path / "m.bin").is_file()
    restorer = iqpir.load(tmp_path / "m.xml", dtype="float32")
    assert restorer.engine.name == "openvino" and restorer.dtype == "float32"
    _compare(restorer, model, torch.rand(2, 3, 32, 32), 0.9, None, 0.4)


@needs_onnx
def test_cli_export_and_restore_with_a_graph(run_dir, tmp_path, capsys, monkeypatch):
    run, _ = run_dir
    monkeypatch.chdir(tmp_path)
    Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype(np.uint8)).save("in.png")

    def cli(*args: str) -> tuple[int, list[str]]:
        code = main(list(args))
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    assert cli("export", str(run), "--format", "onnx", "--out", "w0.onnx")[0] == 0
    code, lines = cli("export", str(run), "--format", "onnx", "--out", "w0.onnx")
    assert code == 2 and "exists" in lines[-1]
    code, lines = cli("restore", "in.png", "--checkpoint", "w0.onnx", "--out", "out")
    assert code == 0, lines
    assert Image.open(tmp_path / "out" / "in.png").size == (36, 40)
    for args, needle in [(("--fidelity", "0.5"), "re-export it with --fidelity"),
                         (("--engine", "torch"), "exported graph"),
                         (("--dtype", "bfloat16"), "float32 only")]:
        code, lines = cli("restore", "in.png", "--checkpoint", "w0.onnx", "--out", "o2", *args)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    code, lines = cli("restore", "in.png", "--checkpoint", str(run), "--out", "o3", "--engine", "onnxruntime")
    assert code == 2 and "iqpir export" in lines[-1]
    code, lines = cli("export", str(run), "--format", "onnx", "--out", "m.xml")
    assert code == 2 and ".onnx file" in lines[-1]
    assert not Path("m.xml").exists() and not Path("o2").exists()


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("kind, runs", [
    ("iqpir", [("iqpir-seed0-S0.9-a0.8", 0.9, 0.0)]),
    ("codeformer", [("codeformer-seed0-w0", None, 0.0), ("codeformer-seed0-w0.5", None, 0.5)]),
])
def test_exported_official_networks_match_the_official_outputs(kind, runs, tmp_path):
    """The paper-size graphs (rule weights of assets/official) give the official codes (at most
    2 of 256 tokens differ) and, where every code agrees, images within 1e-3 (ONNX Runtime,
    OpenVINO f32)."""
    from test_official import rule_state_dict

    torch.save({"params_ema": rule_state_dict(kind)}, tmp_path / f"{kind}.pth")
    export(tmp_path / f"{kind}.pth", "onnx", tmp_path / "m.onnx", fidelity=kind == "codeformer")
    export(tmp_path / f"{kind}.pth", "openvino", tmp_path / "m.xml", fidelity=kind == "codeformer")
    face = torch.from_numpy(np.array(Image.open(ASSETS / "input.png").convert("RGB"))).permute(2, 0, 1)
    face = face.float()[None] / 255
    for path in ("m.onnx", "m.xml"):
        restorer = iqpir.load(tmp_path / path, dtype="float32")
        for name, quality, w in runs:
            reference = np.load(ASSETS / f"{name}.npz")
            out = restorer.engine.outputs(face, quality, None, w)
            if kind == "iqpir":
                codes = torch.stack([out["indices_hq"].flatten(), out["indices_common"].flatten()], 1).numpy()
            else:
                codes = out["indices_common"].flatten().numpy()
            flipped = int((codes != reference["idx"]).reshape(256, -1).any(1).sum())
            # Issue 9's bar: ONNX Runtime's own fp32 kernels flip one near-tied token of the
            # CodeFormer fixture (measured), and a flipped token changes its image region.
            assert flipped <= 2, (path, name, flipped)
            if flipped == 0:
                assert np.abs(out["restored"][0].numpy() - reference["out"]).max() < 1e-3, (path, name)
