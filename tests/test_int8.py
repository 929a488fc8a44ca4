"""The int8 path (issue 24, item 1): `iqpir.quantize` calibrates a graph's convolutions with NNCF,
measures the int8 graph against the float32 one, and caches it by the weights' hash; `--dtype
int8` runs it, `auto` runs a cached one only where it is within its bars on a CPU with int8 dot
products. A tiny random IQPIR network (both codebooks, CFT blocks, 32 px) stands in for the paper's."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from train_helpers import SMALL_MODEL

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir import devices, io, quantize
from iqpir.cli import main
from iqpir.inference.files import read_graph
from iqpir.models import build_restorer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("nncf", "openvino", "onnx")),
                       reason="the int8 extra (nncf, openvino, onnx) is not installed"),
]

VNNI = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})
NO_VNNI = frozenset({"avx2", "fma", "f16c"})


def _network(seed: int = 0):
    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2"])
    cfg.model.cft_resolutions = [16, 32]
    torch.manual_seed(seed)
    return cfg, build_restorer(cfg.model).eval()


def _save(run, seed: int = 0):
    cfg, model = _network(seed)
    run.mkdir(exist_ok=True)
    path = ckpt.checkpoint_stem(run, 1)
    ckpt.save_checkpoint(path, {"model": model.state_dict()}, {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IQPIR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "int8"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny run, its int8 graph made once (in a module-wide cache), and the lines it logged."""
    root = tmp_path_factory.mktemp("int8")
    run = root / "run"
    model = _save(run)
    lines: list[str] = []
    old = os.environ.get("IQPIR_CACHE")
    os.environ["IQPIR_CACHE"] = str(root / "cache")
    try:
        graph = quantize.int8_graph(run, log=lines.append)
    finally:
        if old is None:
            del os.environ["IQPIR_CACHE"]
        else:
            os.environ["IQPIR_CACHE"] = old
    from iqpir.export import export

    float_graph = root / "f32.xml"  # the float32 graph the int8 one is compared with
    export(run, "openvino", float_graph)
    return {"root": root, "run": run, "model": model, "graph": graph, "lines": lines, "float": float_graph}


def test_the_int8_graph_quantises_the_decoder_convolutions_only_and_records_its_fidelity(made):
    import openvino as ov

    graph = read_graph(made["graph"].path)
    info = graph.int8
    assert info["recipe"] == quantize.RECIPE and info["images"] == quantize.CALIBRATION_COUNT
    assert info["weights_sha256"] == quantize.weights_sha256(made["run"])
    quantised = [t.get_node() for op in ov.Core().read_model(str(graph.path)).get_ops()
                 if op.get_type_name() == "FakeQuantize" for t in op.output(0).get_target_inputs()]
    assert {n.get_type_name() for n in quantised} <= quantize.QUANTISED  # the Transformer, lookup, norms stay float
    names = [n.get_friendly_name() for n in quantised]
    assert any("decoder" in n for n in names)
    assert not any("encoder" in n for n in names), names  # the codes are read from the encoder
    # Every weight leaves a bit of headroom (NNCF's overflow fix in every layer): without VNNI,
    # u8 x s8 products are summed in 16 bits and saturate with full 8-bit weights, which took an
    # image 0.044 from float32 where VNNI gives 0.010 (ONEDNN_MAX_CPU_ISA=AVX512_CORE).
    weights = [op.get_data() for op in ov.Core().read_model(str(graph.path)).get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64
    f = info["fidelity"]
    assert info["passes"] is (f["codes"] >= quantize.BARS["codes"]) and f["codes"] >= 0.95, f
    assert any("int8 graph cached" in line for line in made["lines"])


@pytest.mark.parametrize("hint", ["f32", "bf16"])
def test_the_int8_graph_predicts_the_float_graphs_codes_exactly(made, tmp_path, hint):
    """Nothing before the codes is quantised: at the same OpenVINO precision the int8 graph's codes
    are the float32 graph's, bit for bit, on images it was not calibrated on; only the decoder's
    rounding is left in the images."""
    import openvino as ov

    if hint == "bf16" and not devices.cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 1}
    ref = core.compile_model(str(made["float"]), "CPU", config)
    int8 = core.compile_model(str(made["graph"].path), "CPU", config)
    graph = read_graph(made["float"])
    for feed in quantize.feeds(graph, quantize.calibration_images(graph, 4, seed=11)):
        a, b = ref(feed), int8(feed)
        for i, name in enumerate(graph.outputs):
            if name.startswith("indices"):
                assert np.array_equal(a[ref.output(i)], b[int8.output(i)]), name
        diff = np.abs(np.clip(a[ref.output(0)], 0, 1) - np.clip(b[int8.output(0)], 0, 1))
        assert 0 < diff.mean() < 0.02, diff.mean()


def test_the_cached_graph_is_reused_and_a_stale_one_made_again(made, monkeypatch):
    monkeypatch.setenv("IQPIR_CACHE", str(made["root"] / "cache"))
    path = made["graph"].path
    stamp = path.stat().st_mtime_ns
    lines: list[str] = []
    again = quantize.int8_graph(made["run"], log=lines.append)
    assert again.path == path and path.stat().st_mtime_ns == stamp
    assert any("the cached int8 graph" in line for line in lines) and not any("calibrating" in line for line in lines)
    # A cached file whose recorded hash is not the weights' (a copy from elsewhere, a collision
    # of the name's prefix): stale, not used, made again.
    import openvino as ov

    model = ov.Core().read_model(str(path))
    meta = json.loads(model.get_rt_info(["iqpir"]).astype(str))
    meta["int8"]["weights_sha256"] = "0" * 64
    model.set_rt_info(json.dumps(meta), ["iqpir"])
    copy = path.with_name("copy.xml")  # not over the .bin the model reads from (it is mapped)
    ov.save_model(model, str(copy), compress_to_fp16=False)
    del model
    os.replace(copy.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(copy, path)
    assert quantize.cached_int8_graph(made["run"]) is None
    lines.clear()
    rebuilt = quantize.int8_graph(made["run"], log=lines.append)
    assert any("stale" in line for line in lines)
    assert rebuilt.int8["weights_sha256"] == quantize.weights_sha256(made["run"])


def test_new_weights_get_their_own_graph(tmp_path, cache):
    run = tmp_path / "run"
    _save(run, seed=0)
    first, _ = quantize.cached_graph_path(run)
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": _network(seed=1)[1].state_dict()},
                         {"config": C.to_dict(_network()[0]), "step": 1, "arch": "restorer"})
    assert quantize.cached_graph_path(run)[0] != first


def _restore(made, tmp_path, *extra, flags=VNNI, monkeypatch=None, cache=None):
    monkeypatch.setenv("IQPIR_CACHE", str(cache or made["root"] / "cache"))
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    src = tmp_path / "in"
    io.write_image(src / "a.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)))
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    assert main(["restore", str(src), "--checkpoint", str(made["run"]), "--aligned", "--out", str(out),
                 "--device", "cpu", *extra]) == 0
    return io.read_image(out / "a.png").rgb


def test_auto_never_runs_an_int8_graph_an_earlier_run_cached(made, tmp_path, monkeypatch, capsys):
    """The same command gives the same engine and the same pixels whatever is cached: after a
    `--dtype int8` run left a sound graph, on a CPU with VNNI, `auto` still runs the torch path."""
    before = _restore(made, tmp_path, monkeypatch=monkeypatch, cache=tmp_path / "empty")  # nothing cached
    int8 = _restore(made, tmp_path, "--dtype", "int8", monkeypatch=monkeypatch)
    assert "openvino int8 convolutions" in capsys.readouterr().err
    after = _restore(made, tmp_path, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert "openvino int8" not in err and "torch bfloat16" in err, err
    assert np.array_equal(after.numpy(), before.numpy()) and not np.array_equal(after.numpy(), int8.numpy())


@pytest.mark.slow  # makes a second graph (about 10 s); the int8-cache-ignores-cft mutant runs it
def test_a_fidelity_above_zero_gets_a_graph_with_the_cft_blocks(made, tmp_path, monkeypatch):
    """--fidelity 0.7 with --dtype int8 makes (and caches apart) the graph with the fidelity input;
    --fidelity 0 takes the one without it."""
    monkeypatch.setenv("IQPIR_CACHE", str(made["root"] / "cache"))
    monkeypatch.setattr(devices, "cpu_flags", lambda: VNNI)
    made_cft = quantize.int8_for(made["run"], fidelity=0.7, log=lambda line: None)
    assert "fidelity" in made_cft.inputs and made_cft.path != made["graph"].path
    assert quantize.int8_for(made["run"], fidelity=0.0, log=lambda line: None).path == made["graph"].path


def test_calibration_images_come_from_a_folder_at_the_graphs_size(made, tmp_path):
    """--calibration FOLDER: crops of the user's own images, at the graph's face size, in [0, 1]."""
    for i in range(2):
        io.write_image(tmp_path / "own" / f"f{i}.png", torch.full((3, 40, 48), 0.25 + 0.5 * i))
    graph = read_graph(made["graph"].path)
    images = quantize.calibration_images(graph, 4, seed=0, folder=tmp_path / "own")
    assert [x.shape for x in images] == [(1, 3, graph.image_size, graph.image_size)] * 4
    assert {round(float(x.mean()), 2) for x in images[:2]} == {0.25, 0.75}  # each of the two images
    with pytest.raises(ValueError, match="no images there"):
        quantize.calibration_images(graph, 4, seed=0, folder=tmp_path / "own" / "none")


def test_int8_works_from_python_as_from_the_cli(made, tmp_path, monkeypatch):
    """iqpir.load(checkpoint, dtype="int8") runs the checkpoint's int8 graph (the cached one here),
    as `iqpir restore --dtype int8` does, and gives the CLI's pixels."""
    monkeypatch.setenv("IQPIR_CACHE", str(made["root"] / "cache"))
    lines: list[str] = []
    restorer = iqpir.load(made["run"], device="cpu", dtype="int8", log=lines.append)
    assert restorer.engine.describe().startswith("openvino int8") and restorer.dtype == "int8"
    assert any("the cached int8 graph of these weights" in line for line in lines), lines
    cli = _restore(made, tmp_path, "--dtype", "int8", monkeypatch=monkeypatch)
    x = io.read_image(tmp_path / "in" / "a.png").rgb  # the CLI's input
    assert np.array_equal(io.to_uint8(restorer.restore(x)), io.to_uint8(cli))


def test_int8_refusals(made, tmp_path, capsys):
    with pytest.raises(ValueError, match="is an int8 graph: restore it with --dtype int8"):
        iqpir.load(made["graph"].path, dtype="float32")
    with pytest.raises(ValueError, match="leave --engine torch out"):
        quantize.int8_for(made["run"], engine="torch")
    assert main(["export", str(made["run"]), "--format", "onnx", "--int8", "--out", str(tmp_path / "g.onnx")]) == 2
    assert "--int8 writes an OpenVINO graph: use --format openvino" in capsys.readouterr().err
    assert main(["export", str(made["run"]), "--format", "openvino", "--calibration", str(tmp_path),
                 "--out", str(tmp_path / "g.xml")]) == 2
    assert "--calibration calibrates an int8 graph: add --int8" in capsys.readouterr().err
    assert not list(tmp_path.glob("g.*"))


@pytest.mark.slow
def test_export_int8_writes_a_graph_that_restores(made, tmp_path, capsys):
    out = tmp_path / "g8.xml"
    assert main(["export", str(made["run"]), "--format", "openvino", "--int8", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "int8: codes" in err and "the bar (codes >= 97%)" in err
    graph = read_graph(out)
    assert graph.int8["fidelity"]["codes"] > 0.9 and out.with_suffix(".bin").is_file()
    assert iqpir.load(out).engine.describe().startswith("openvino int8")


def test_the_app_serves_the_int8_graph(made, monkeypatch):
    """`iqpir app --dtype int8` serves the checkpoint's int8 graph; on a CPU without int8 dot
    products `auto` serves the torch network (the server itself is not started)."""
    import uvicorn

    monkeypatch.setenv("IQPIR_CACHE", str(made["root"] / "cache"))
    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))

    def engine(*flags):
        assert main(["app", "--checkpoint", str(made["run"]), "--device", "cpu", "--port", "0", *flags]) == 0
        return served["app"].state.service.restorer.engine.describe()

    assert engine("--dtype", "int8").startswith("openvino int8")
    monkeypatch.setattr(devices, "cpu_flags", lambda: NO_VNNI)
    assert engine().startswith("torch")
