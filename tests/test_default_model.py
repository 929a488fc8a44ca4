"""The packaged default model (iqpir/weights) and the recipe that makes it (iqpir.training.default_model).

The packaged weights load and restore offline in a few seconds, with no --checkpoint, on every path
that takes one; quality numbers live in the model card and benchmarks/default_model.py, not here.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import read_metrics

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir import io
from iqpir.cli import main
from iqpir.inference import files
from iqpir.plugin import conditioned_unet
from iqpir.training import default_model as dm
from iqpir.training import loop
from iqpir.weights import DEFAULT_CARD, DEFAULT_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")
needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
                                reason="needs the onnx extra: pip install 'iqpir[onnx]'")


def test_the_packaged_model_loads_without_a_path_and_restores():
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size <= 60e6
    restorer = iqpir.load(device="cpu", dtype="float32")
    assert restorer.kind == "default" and restorer.supports_quality
    assert not restorer.supports_alpha and not restorer.supports_fidelity
    import skimage.data

    # a degraded photo (4x down and up again: blur): a clean input would rightly come back as it is
    photo = torch.from_numpy(skimage.data.astronaut()[100:248, 150:300].copy()).permute(2, 0, 1).float()[None] / 255
    small = torch.nn.functional.interpolate(photo, scale_factor=0.25, mode="area")
    x = torch.nn.functional.interpolate(small, size=photo.shape[-2:], mode="bilinear")[0].clamp(0, 1)
    hi, lo = restorer.restore(x, quality=1.0), restorer.restore(x, quality=0.0)
    assert hi.shape == x.shape and torch.isfinite(hi).all() and 0 <= hi.min() and hi.max() <= 1
    assert (hi - x).abs().mean() > 1e-3  # a trained network, not the identity it starts as
    assert (hi - lo).abs().mean() > 1e-3  # S reaches the output
    torch.testing.assert_close(restorer.restore(x), hi)  # quality defaults to 1
    for knob, value in (("alpha", 0.5), ("fidelity", 0.5)):
        with pytest.raises(ValueError, match=f"this default model has no .*--{knob}"):
            restorer.restore(x, **{knob: value})


def test_the_card_describes_the_packaged_weights():
    card = json.loads(DEFAULT_CARD.read_text())
    meta = files._safetensors_meta(DEFAULT_WEIGHTS)
    model = conditioned_unet(**meta["network"])
    assert card["architecture"]["parameters"] == sum(p.numel() for p in model.parameters())
    for key in ("data", "training", "recipe", "results"):
        assert card[key]
    assert card["training"]["steps"] > 0 and card["data"]["photos"]
    assert set(card["results"]["moderate"]) >= {"input", "S=0.0", "S=0.5", "S=1.0"}


def test_missing_default_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(files, "DEFAULT_WEIGHTS", tmp_path / "default.safetensors")
    with pytest.raises(FileNotFoundError, match="packaged default model is missing"):
        files.describe(None)


def test_cli_restores_with_the_default_model_and_refuses_its_missing_knobs(tmp_path, capsys):
    src = tmp_path / "in" / "a.png"
    io.write_image(src, torch.rand(3, 40, 48))
    assert main(["restore", str(src), "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "float32"]) == 0
    out = io.load_rgb(tmp_path / "out" / "a.png")
    expected = iqpir.load(device="cpu", dtype="float32").restore(io.load_rgb(src), quality=1.0)
    assert out.shape == (3, 40, 48) and (out - expected).abs().max() <= 1 / 255 + 1e-6
    assert main(["restore", str(src), "--out", str(tmp_path / "o2"), "--alpha", "0.5", "--device", "cpu"]) != 0
    assert "this default model has no codebooks: --alpha" in capsys.readouterr().err


def tiny_file(tmp_path, seed: int = 0):
    """A small conditioned U-Net in the packaged format, with random weights."""
    torch.manual_seed(seed)
    net = C.UNetConfig(channels=8, levels=3)
    model = dm.build_network(net)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    meta = {"format": files.PLUGIN_FORMAT, "architecture": "conditioned_unet", "network": vars(net)}
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"iqpir": json.dumps(meta)})
    return path, model.eval()


def test_a_unet_file_is_described_and_restores_as_the_network(tmp_path):
    path, model = tiny_file(tmp_path)
    described = files.describe(path)
    assert (described.kind, described.call, described.image_size, described.size_multiple) == ("unet", "image", None, 8)
    restorer = iqpir.load(path, device="cpu", dtype="float32")
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(restorer.restore(x, quality=0.3), model(x, 0.3).clamp(0, 1))


@needs_onnx
def test_a_unet_exports_to_onnx_at_any_size(tmp_path):
    from iqpir.export import export

    path, model = tiny_file(tmp_path)
    info = export(path, "onnx", tmp_path / "unet.onnx")
    assert info.inputs == ["image", "quality"] and info.image_size is None and info.size_multiple == 8
    restorer = iqpir.load(tmp_path / "unet.onnx")
    for shape, s in (((3, 24, 40), 0.2), ((3, 33, 17), 0.9)):  # sizes the export never saw; padding inside
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = restorer_ref = model(torch.nn.functional.pad(x[None], (0, -x.shape[2] % 8, 0, -x.shape[1] % 8),
                                                              mode="reflect"), s)[0, :, :shape[1], :shape[2]]
        torch.testing.assert_close(restorer.restore(x, quality=s), restorer_ref.clamp(0, 1), atol=1e-4, rtol=0)
        assert ref.shape == x.shape
    with pytest.raises(ValueError, match="has no codebooks: --alpha"):
        restorer.restore(torch.rand(3, 16, 16), alpha=0.5)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def small_work(tmp_path, n: int = 6):
    """A work folder as `data` leaves it, from random crops: crops.safetensors, data.json and the held-out set."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 4, 3, 48, 48, generator=g) * 255).round().to(torch.uint8)
    scores = torch.rand(n, 4, generator=g)
    ckpt.save_tensors(tmp_path / "crops.safetensors", {"images": images, "scores": scores})
    info = {"crops": n, "crop": 48, "sides": [48], "levels": [list(x) for x in dm.GT_LEVELS], "metrics": ["niqe"],
            "normalization": "minmax", "constants": {"niqe": [2.0, 9.0]}, "mean_score_per_level": [0.5] * 4,
            "crops_per_photo": {"random": n}, "held_out": ["a", "b"]}
    (tmp_path / "data.json").write_text(json.dumps(info))
    for name in ("a", "b"):
        ref = torch.rand(3, 32, 40, generator=g)
        io.write_image(tmp_path / "heldout" / "reference" / f"{name}.png", ref)
        io.write_image(tmp_path / "heldout" / "degraded" / f"{name}.png", (ref + 0.05).clamp(0, 1))
    return images, scores


def small_recipe(*extra: str) -> C.RunConfig:
    """The default-model preset at test size: a 3-level U-Net of 8 channels, 32-px patches, batch 2."""
    return dm.recipe_config("model.unet.channels=8", "model.unet.levels=3", "model.image_size=32",
                            "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1",
                            "train.ckpt_every=1", *extra)


def logged(run) -> list[dict]:
    """metrics.csv without the clock."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(run)]


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    images, scores = small_work(tmp_path)
    cfg = small_recipe("train.batch_size=3")
    a, b = dm.sample_batch(images, scores, cfg, 7), dm.sample_batch(images, scores, cfg, 7)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = dm.sample_batch(images, scores, cfg, 8)
    assert not torch.equal(a[0], c[0])
    lq, target, s = a
    assert lq.shape == target.shape == (3, 3, 32, 32) and s.shape == (3,)
    assert all(float(v) in scores.flatten().tolist() for v in s)  # S is a target's own score


def test_clean_inputs_come_back_as_themselves_at_any_s(tmp_path):
    """data.clean_inputs = 1: every pair is (clean crop, the same crop, S uniform); at 0 the batches
    are the ones the recipe always drew (the clean draws come after the rest)."""
    images, scores = small_work(tmp_path)
    plain = dm.sample_batch(images, scores, small_recipe("train.batch_size=4"), 3)
    lq, target, s = dm.sample_batch(images, scores, small_recipe("train.batch_size=4", "data.clean_inputs=1"), 3)
    assert torch.equal(lq, target) and not torch.equal(lq, plain[0])
    assert not any(float(v) in scores.flatten().tolist() for v in s) and bool(((s >= 0) & (s <= 1)).all())
    half = dm.sample_batch(images, scores, small_recipe("train.batch_size=4", "data.clean_inputs=0.5"), 3)
    kept = [bool(torch.equal(half[0][i], half[1][i])) for i in range(4)]
    assert all(torch.equal(half[0][i], plain[0][i]) for i in range(4) if not kept[i])
    with pytest.raises(C.ConfigError, match="conditioned_unet"):
        C.load(preset="tiny", overrides=["data.clean_inputs=0.5"])


def test_a_sitting_warm_starts_from_weights_and_its_card_counts_all_steps(tmp_path):
    """--init: a new run starts from the given weights (lr 0 keeps them), init.json records the
    file and the steps its card had, and the written card adds this run's steps to those."""
    small_work(tmp_path / "work")
    cfg = small_recipe("train.steps=1", "train.lr=0", "train.min_lr=0")
    start = {k: v + 0.5 for k, v in dm.build_network(cfg.model.unet).state_dict().items()}  # no init gives these
    ckpt.save_tensors(tmp_path / "start.safetensors", start)
    (tmp_path / "start.json").write_text(json.dumps({"training": {"cumulative_steps": 500}}))
    assert dm.train(tmp_path / "work", cfg, threads=1, init=tmp_path / "start.safetensors").completed
    after, _ = ckpt.load_checkpoint(tmp_path / "work")
    assert all(torch.equal(after["model"][k], v) for k, v in start.items())
    assert json.loads((tmp_path / "work" / "init.json").read_text())["steps_before"] == 500
    assert dm._warm_start(tmp_path / "work", 1)["cumulative_steps"] == 501


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    """4 steps straight equal 2 steps, a stop, and 2 resumed steps: the same weights, Adam moments
    and logged losses; the work folder holds the loop's checkpoint layout (safetensors + JSON)."""
    cfg = small_recipe("train.steps=4")
    whole, split = tmp_path / "whole", tmp_path / "split"
    for work in (whole, split):
        work.mkdir()
        small_work(work)
    assert dm.train(whole, cfg, threads=1).completed
    stopped = dm.train(split, cfg, threads=1, stop_after=2)
    assert (stopped.completed, stopped.step, ckpt.load_checkpoint_meta(split)["step"]) == (False, 2, 2)
    assert dm.train(split, cfg, threads=1).completed
    a, meta = ckpt.load_checkpoint(whole)
    b, _ = ckpt.load_checkpoint(split)
    for group in ("model", "optim.generator"):
        assert a[group].keys() == b[group].keys() and all(torch.equal(a[group][k], b[group][k]) for k in a[group])
    assert [int(r["step"]) for r in logged(split)] == [1, 2, 3, 4] and logged(whole) == logged(split)
    assert (meta["arch"], C.from_dict(meta["config"]).model.unet) == ("conditioned_unet", cfg.model.unet)
    assert [p.name for p in (whole / "checkpoints").iterdir()] and not list(whole.rglob("*.pt"))
    assert {p.suffix for p in (whole / "checkpoints").iterdir()} == {".safetensors", ".json"}


def test_the_recipe_schedule_is_the_loops():
    """Warm-up to train.lr over train.warmup_steps, then a cosine to train.min_lr at train.steps."""
    tc = dm.recipe_config("train.steps=100", "train.lr=1e-3", "train.min_lr=1e-5", "train.warmup_steps=10").train
    lr = [tc.lr * loop.lr_scale(tc, s) for s in (0, 9, 10, 99, 100)]
    cosine = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90))
    assert lr == pytest.approx([1e-4, 1e-3, 1e-3, cosine, 1e-5])


def test_bf16_precision_computes_in_bf16_and_keeps_float32_master_weights(tmp_path):
    images, scores = small_work(tmp_path)
    inputs = {}
    for precision, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = small_recipe("train.steps=2", f"train.precision={precision}")
        seen = []

        def setup(info, cfg=cfg, seen=seen):
            task = dm.build_task(cfg)
            task.generator.network.stem.register_forward_hook(lambda m, a, o: seen.append((a[0].detach(), o.dtype)))
            return task, dm.CropBatches(images, scores, cfg, info)

        run = tmp_path / precision
        assert loop.run(cfg, setup, run, loop.TrainOptions(device="cpu", progress=False)).completed
        assert [out for _, out in seen] == [dtype] * 2  # the convolutions ran in bf16 under autocast
        inputs[precision] = seen[0][0]
        tensors, _ = ckpt.load_checkpoint(run)
        for group in ("model", "optim.generator"):
            assert {t.dtype for t in tensors[group].values() if t.is_floating_point()} == {torch.float32}
    # the batches are made outside autocast: the data do not depend on the precision
    assert inputs["bf16"].dtype == torch.float32 and torch.equal(inputs["bf16"], inputs["float32"])


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(loop, "native_bf16", lambda device, native=native: native)
        assert loop.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
        assert loop.autocast_dtype("bf16", cpu) == torch.bfloat16 and loop.autocast_dtype("float32", cpu) is None


def test_written_weights_load_as_the_packaged_format(tmp_path, monkeypatch):
    """`write` turns the run's latest checkpoint into the file and card the loader reads."""
    monkeypatch.setattr(dm, "evaluate", lambda model, refs, lqs, sweep=(0.0, 0.5, 1.0): {})
    small_work(tmp_path)
    dm.train(tmp_path, small_recipe("train.steps=2"), threads=1)
    card = dm.write_model(tmp_path, tmp_path / "weights", machine="test")
    model, _, _ = dm.trained_network(tmp_path)
    restorer = iqpir.load_restorer(tmp_path / "weights" / "default.safetensors", device="cpu", dtype="float32")
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(restorer.restore(x, quality=0.3), model(x, 0.3).clamp(0, 1))
    assert card["training"]["steps"] == 2 and card["training"]["patch"] == 32
    assert card["architecture"]["parameters"] == sum(p.numel() for p in model.parameters())
