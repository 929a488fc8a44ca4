"""Damaged model files of every format iqpir reads: one line naming the file, exit 2, nothing written.

A file cut short by a failed download or a full disk, and an OpenVINO graph whose .bin does not
belong to its .xml, must never end in a traceback (or, worse, load)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from test_default_model import tiny_file

from iqpir import io
from iqpir.cli import main

HAS_GRAPHS = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "openvino"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny U-Net file and, where the extras are there, its ONNX and OpenVINO graphs."""
    from iqpir.export import export

    root = tmp_path_factory.mktemp("models")
    unet, _ = tiny_file(root)
    found = {"safetensors": unet}
    if HAS_GRAPHS:
        export(unet, "onnx", root / "m.onnx")
        export(unet, "openvino", root / "m.xml")
        found |= {"onnx": root / "m.onnx", "xml": root / "m.xml"}
    return found


def _cut(src, dst, keep: float):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


CASES = ["safetensors-cut", "safetensors-header-only", "onnx-cut", "xml-cut", "bin-cut", "bin-of-another-size"]


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_model_file_is_one_line_naming_it(case, models, tmp_path, capsys):
    kind = case.split("-")[0]
    if kind in ("onnx", "xml", "bin") and not HAS_GRAPHS:
        pytest.skip("needs the onnx and openvino extras")
    if case == "safetensors-cut":
        bad = _cut(models["safetensors"], tmp_path / "m.safetensors", 0.6)
    elif case == "safetensors-header-only":
        bad = _cut(models["safetensors"], tmp_path / "m.safetensors", 0.02)
    elif case == "onnx-cut":
        bad = _cut(models["onnx"], tmp_path / "m.onnx", 0.5)
    elif case == "xml-cut":
        shutil.copy(models["xml"].with_suffix(".bin"), tmp_path / "m.bin")
        bad = _cut(models["xml"], tmp_path / "m.xml", 0.5)
    else:
        shutil.copy(models["xml"], tmp_path / "m.xml")
        keep = 0.5 if case == "bin-cut" else 0.999
        _cut(models["xml"].with_suffix(".bin"), tmp_path / "m.bin", keep)
        bad = tmp_path / "m.xml"
    io.write_image(tmp_path / "in" / "a.png", torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0)))
    capsys.readouterr()
    code = main(["restore", str(tmp_path / "in"), "--checkpoint", str(bad), "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert str(bad) in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out" / "a.png").exists()
