"""One loader: model files are opened in the loader's modules only, every kind of file loads
through iqpir.load with its description, and `iqpir model-info` reads whatever iqpir.load reads."""

from __future__ import annotations

import ast
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from train_helpers import SMALL_MODEL

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.cli import main
from iqpir.inference import files
from iqpir.inference.knobs import record, resolve_knobs
from iqpir.inference.loader import model_info
from iqpir.models import build_restorer

pytestmark = pytest.mark.usefixtures("one_thread")
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "iqpir"
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_OPENVINO = HAS_ONNX and importlib.util.find_spec("openvino") is not None
HAS_SPANDREL = importlib.util.find_spec("spandrel") is not None

# The modules that may open model files (tensors or graphs), and why.
LOADERS = {
    "checkpoint.py": "the low-level tensor readers: iqpir checkpoints (safetensors + JSON), weights-only .pth "
                     "files (released networks, face detectors), packaged safetensors bytes (NIQE's pristine model)",
    "inference/files.py": "the loader: describes every kind of model file once, and hands an exported graph's "
                          "bytes to its runtime",
}
# Modules that still read files themselves, each with the reason and who removes it.
EXCEPTIONS = {
    "training/default_model.py": "the default model's own training checkpoints (safetensors + torch.save): the "
                                 "training-loop work moves them onto iqpir.checkpoint",
}
# Calls that open a model file: method names, whatever object they are called on...
READ_METHODS = {"read_model", "compile_model", "InferenceSession", "load_file", "safe_open"}
# ...and names imported from these modules.
READ_IMPORTS = {"safetensors": {"safe_open", "load", "load_file"}, "safetensors.torch": {"load", "load_file", "safe_open"},
                "torch": {"load"}, "onnxruntime": {"InferenceSession"}}


def model_reads(source: str) -> list[str]:
    """'line: what' for each place in `source` that opens a model file (see READ_METHODS, READ_IMPORTS,
    and torch.load / safetensors.torch.load called through their modules)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in READ_IMPORTS:
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in READ_IMPORTS[node.module]]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, ast.unparse(node.func.value)
            if name in READ_METHODS or (name == "load" and owner in ("torch", "safetensors.torch")):
                found.append(f"{node.lineno}: {owner}.{name}(...)")
    return found


def test_the_walker_finds_each_way_of_opening_a_model_file():
    source = "\n".join([
        "import torch, safetensors.torch", "from safetensors.torch import load_file as lf",
        "from safetensors import safe_open", "from torch import load", "def f(p, ov, ort, core):",
        "    torch.load(p)", "    safetensors.torch.load(b'')", "    ov.Core().read_model(p)",
        "    core.compile_model(p)", "    ort.InferenceSession(p)", "    torch.nn.Module.load_state_dict",
        "    json.load(p)",
    ])
    assert {line.split(": ", 1)[1] for line in model_reads(source)} == {
        "from safetensors.torch import load_file", "from safetensors import safe_open", "from torch import load",
        "torch.load(...)", "safetensors.torch.load(...)", "ov.Core().read_model(...)", "core.compile_model(...)",
        "ort.InferenceSession(...)"}  # json.load and load_state_dict read no model file


def test_model_files_are_opened_by_the_loader_only():
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name in LOADERS or name in EXCEPTIONS:
            continue
        reads = model_reads(path.read_text())
        if reads:
            bad[name] = reads
    assert not bad, f"model files opened outside {sorted(LOADERS)}: {bad}"
    for name in LOADERS:  # the list names modules that exist and do read
        assert model_reads((PACKAGE / name).read_text()), name


# --------------------------------------------------------------------------------------
# Every kind of file through iqpir.load
# --------------------------------------------------------------------------------------


def tiny_run(folder: Path, trained_w: float = 0.5) -> Path:
    """A stage-2 run of a small dual-codebook network with CFT blocks, trained at w = trained_w."""
    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2", "model.alpha=0.7"])
    cfg.model.cft_resolutions = [16, 32]
    cfg.train.fidelity = trained_w
    torch.manual_seed(0)
    model = build_restorer(cfg.model).eval()
    with torch.no_grad():  # CFT blocks that change the output at w > 0
        for p in model.cft.parameters():
            p.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(ckpt.checkpoint_stem(folder, 1), {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("loader") / "run")


def _official(kind, tmp_path, monkeypatch):
    from test_official import tiny_release

    state, _ = tiny_release(kind, monkeypatch)
    path = tmp_path / f"{kind}.pth"
    torch.save({"params_ema": state}, path)
    return path


def _graph(suffix):
    def make(run, tmp_path, monkeypatch):
        from iqpir.export import export

        path = tmp_path / f"model{suffix}"
        export(run, "onnx" if suffix == ".onnx" else "openvino", path, fidelity=True)
        return path
    return make


def _spandrel(run, tmp_path, monkeypatch):
    from test_upscalers import real_esrgan_state

    path = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": real_esrgan_state(2)}, path)
    return path


def _unet(run, tmp_path, monkeypatch):
    from test_default_model import tiny_file

    return tiny_file(tmp_path)[0]


NOT_TRAINED = {"source": "default"}
# kind of file -> (how to make it, what its description must say). knobs: name -> (value, from).
KINDS = {
    "iqpir checkpoint": (lambda run, tmp, mp: run, {
        "kind": "iqpir", "format": "torch", "image_size": 32, "scale": 1, "licence": None,
        "knobs": {"quality": (1.0, "default"), "alpha": (0.7, "checkpoint"), "fidelity": (0.5, "checkpoint")}}),
    "official IQPIR .pth": (lambda run, tmp, mp: _official("iqpir", tmp, mp), {
        "kind": "iqpir", "format": "torch", "image_size": 32, "scale": 1, "licence": "non-commercial",
        "knobs": {"quality": (1.0, "default"), "alpha": (0.8, "default"), "fidelity": (0.0, "default")}}),
    "official CodeFormer .pth": (lambda run, tmp, mp: _official("codeformer", tmp, mp), {
        "kind": "codeformer", "format": "torch", "image_size": 32, "scale": 1, "licence": "non-commercial",
        "knobs": {"quality": (None, "default"), "alpha": (None, "default"), "fidelity": (0.0, "default")}}),
    "onnx graph": (_graph(".onnx"), {
        "kind": "iqpir", "format": "onnx", "image_size": 32, "scale": 1, "licence": None,
        "knobs": {"quality": (1.0, "default"), "alpha": (0.7, "checkpoint"), "fidelity": (0.5, "checkpoint")}}),
    "openvino graph": (_graph(".xml"), {
        "kind": "iqpir", "format": "openvino", "image_size": 32, "scale": 1, "licence": None,
        "knobs": {"quality": (1.0, "default"), "alpha": (0.7, "checkpoint"), "fidelity": (0.5, "checkpoint")}}),
    "packaged default model": (lambda run, tmp, mp: None, {
        "kind": "default", "format": "torch", "image_size": None, "scale": 1, "licence": None,
        "knobs": {"quality": (1.0, "default"), "alpha": (None, "default"), "fidelity": (None, "default")}}),
    "quality-conditioned U-Net": (_unet, {
        "kind": "unet", "format": "torch", "image_size": None, "scale": 1, "licence": None,
        "knobs": {"quality": (1.0, "default"), "alpha": (None, "default"), "fidelity": (None, "default")}}),
    "spandrel upscaler": (_spandrel, {
        "kind": "ESRGAN", "format": "torch", "image_size": None, "scale": 2, "licence": "spandrel",
        "knobs": {"quality": (None, "default"), "alpha": (None, "default"), "fidelity": (None, "default")}}),
}
NEEDS = {"onnx graph": HAS_ONNX, "openvino graph": HAS_OPENVINO, "spandrel upscaler": HAS_SPANDREL}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_file_loads_through_iqpir_load_with_its_description(kind, run, tmp_path, monkeypatch, capsys):
    if not NEEDS.get(kind, True):
        pytest.skip(f"{kind}: its extra is not installed")
    make, want = KINDS[kind]
    path = make(run, tmp_path, monkeypatch)
    restorer = iqpir.load(path, device="cpu", dtype="float32")
    d = restorer.described
    assert (d.kind, d.format, d.image_size, d.scale) == (want["kind"], want["format"], want["image_size"], want["scale"])
    got = {name: (k.value if k.value is None else round(k.value, 6), k.source)
           for name, k in restorer.knobs().items() if name != "blend"}
    assert got == want["knobs"], kind
    licence = (d.source or {}).get("licence")
    assert (licence is None) if want["licence"] is None else want["licence"] in licence, d.source
    size = d.image_size or 16
    out = restorer.restore(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 3, size * d.scale, size * d.scale)
    # model-info reads every file iqpir.load reads, and says the same
    assert main(["model-info", "--checkpoint", "default" if path is None else str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == d.kind and info["scale"] == d.scale
    assert info["knobs"] == record(resolve_knobs(files.describe(path)))
    if d.format == "torch":
        assert info["parameters"]["total_params"] == sum(t.numel() for t in files.describe(path).model.state_dict().values())


def test_model_info_of_a_stage1_autoencoder(stage1_run, capsys):
    """A VQGAN is described (kind, sizes, parameters) though it does not restore."""
    info = model_info(stage1_run)
    assert info["kind"] == "vqgan" and info["codebooks"] in (1, 2) and "knobs" not in info
    with pytest.raises(ValueError, match="stage-1"):
        iqpir.load(stage1_run)


def test_the_former_names_work_with_a_deprecation_warning(run):
    with pytest.warns(DeprecationWarning, match="load_restorer is now iqpir.load"):
        old = iqpir.load_restorer(run, device="cpu", dtype="float32")
    with pytest.warns(DeprecationWarning, match=r"backend=\.\.\.\) is now engine"):
        renamed = iqpir.load(run, device="cpu", dtype="float32", backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = iqpir.load(run, device="cpu", dtype="float32", engine="torch")
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(old.restore(x), new.restore(x)) and torch.equal(renamed.restore(x), new.restore(x))
    assert iqpir.load(new) is new  # a ready Restorer is taken as it is
    with pytest.raises(TypeError, match="unknown option"):
        iqpir.load(run, batchsize=2)


def test_the_former_cli_flag_backend_still_works_with_a_warning(run, tmp_path, capsys):
    from iqpir import io

    io.write_image(tmp_path / "in" / "p.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)))
    args = ["restore", str(tmp_path / "in" / "p.png"), "--checkpoint", str(run), "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--out", str(tmp_path / "old"), "--backend", "torch"]) == 0
    assert "--backend is now --engine" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "new"), "--engine", "torch"]) == 0
    assert "--backend" not in capsys.readouterr().err
    assert (tmp_path / "old" / "p.png").read_bytes() == (tmp_path / "new" / "p.png").read_bytes()
    assert main([*args, "--out", str(tmp_path / "both"), "--engine", "torch", "--backend", "onnxruntime"]) == 2
    assert main([*args, "--out", str(tmp_path / "ort"), "--backend", "onnxruntime"]) == 2  # taken, and refused
    assert "--engine onnxruntime runs a graph" in capsys.readouterr().err
