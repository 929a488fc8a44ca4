"""Checkpoints: safetensors + JSON, run-folder resolution, model rebuild, optimizer and RNG states."""

from __future__ import annotations

import json
import pickle
import random
import re

import numpy as np
import pytest
import torch

from iqpir import config as C
from iqpir.checkpoint import (
    checkpoint_stem,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)
from iqpir.models import Restorer, VQAutoEncoder, build_restorer, build_vqgan


def run_cfg(stage: int) -> C.RunConfig:
    return C.from_dict({"preset": "tiny", "model": {"image_size": 32}, "train": {"stage": stage}})


@pytest.fixture(autouse=True)
def _no_pickle(monkeypatch):
    """Loading must never unpickle: make every pickle entry point fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("stage", [1, 2])
def test_saved_model_restores_bit_equal_outputs(tmp_path, stage):
    torch.manual_seed(0)
    cfg = run_cfg(stage)
    model = (build_vqgan if stage == 1 else build_restorer)(cfg.model).eval()
    (tmp_path / "run").mkdir()
    meta = {"config": C.to_dict(cfg), "step": 7}
    stem = save_checkpoint(tmp_path / "run", {"model": model.state_dict()}, meta)
    assert stem == checkpoint_stem(tmp_path / "run", 7)

    loaded, loaded_cfg = load_model(tmp_path / "run")
    assert isinstance(loaded, VQAutoEncoder if stage == 1 else Restorer)
    assert not loaded.training and loaded_cfg == cfg
    x, q = torch.rand(2, 3, 32, 32), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        if stage == 1:
            assert torch.equal(model(x, q).reconstruction, loaded(x, q).reconstruction)
        else:
            a, b = model(x, q), loaded(x, q)
            assert torch.equal(a.restored, b.restored) and torch.equal(a.logits_hq, b.logits_hq)


def test_load_model_prefers_ema_and_honours_arch(tmp_path):
    torch.manual_seed(0)
    cfg = run_cfg(1)
    model, ema = build_restorer(cfg.model), build_restorer(cfg.model)
    stem = tmp_path / "ckpt"
    meta = {"config": C.to_dict(cfg), "arch": "restorer"}  # arch wins over train.stage = 1
    save_checkpoint(stem, {"model": model.state_dict(), "ema": ema.state_dict()}, meta)
    loaded, _ = load_model(stem.with_suffix(".safetensors"))
    assert isinstance(loaded, Restorer)
    assert torch.equal(loaded.transformer.pos_emb, ema.transformer.pos_emb)
    raw, _ = load_model(stem, weights="model")
    assert torch.equal(raw.transformer.pos_emb, model.transformer.pos_emb)


def test_flat_and_grouped_tensors_round_trip(tmp_path):
    flat = {
        "a": torch.arange(6, dtype=torch.int64).view(2, 3),
        "b": torch.tensor(1.5),  # 0-d, like Adam's step
        "c": torch.ones(2).bool(),
    }
    save_checkpoint(tmp_path / "flat", flat, {"note": "x"})
    back, meta = load_checkpoint(tmp_path / "flat.json")
    assert meta == {"note": "x"}
    assert set(back) == set(flat)
    assert all(torch.equal(back[k], flat[k]) and back[k].dtype == flat[k].dtype for k in flat)

    shared = torch.zeros(4)
    grouped = {"model": {"w": shared, "v": shared}, "empty": {}}  # shared storage, an empty group
    save_checkpoint(tmp_path / "grouped", grouped, {})
    back, _ = load_checkpoint(tmp_path / "grouped")
    assert set(back) == {"model", "empty"} and back["empty"] == {}
    assert torch.equal(back["model"]["w"], shared) and torch.equal(back["model"]["v"], shared)


def test_run_folder_resolves_to_the_highest_complete_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(run)
    for step in (900, 10_000, 2_000):
        save_checkpoint(run, {"x": torch.tensor([float(step)])}, {"step": step})
    assert [s for s, _ in list_checkpoints(run)] == [900, 2_000, 10_000]
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_00010000"
    # A crash between the two writes leaves tensors without JSON: not a checkpoint.
    (run / "checkpoints" / "step_00020000.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(run).name == "step_00010000"
    assert list((run / "checkpoints").glob("*.tmp")) == []
    with pytest.raises(FileNotFoundError, match="step_00020000.json"):
        resolve_checkpoint(run / "checkpoints" / "step_00020000.safetensors")


def test_save_rejects_bad_meta(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "c", {"x": torch.zeros(1)}, {"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", {"x": torch.zeros(1)}, {"format": "mine"})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, {"x": torch.zeros(1)}, {})
    assert not (tmp_path / "c.safetensors").exists()


def test_optimizer_state_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [
        {"params": net[0].parameters(), "lr": 1e-3},
        {"params": net[1].parameters(), "lr": 5e-4, "betas": (0.5, 0.9)},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        net(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    state = opt.state_dict()

    tensors, skeleton = flatten_state(state)
    skeleton = json.loads(json.dumps(skeleton))  # what the sidecar holds
    back = unflatten_state(tensors, skeleton)
    assert back["param_groups"] == state["param_groups"]  # tuples, floats, ints, bools, None
    assert isinstance(back["param_groups"][1]["betas"], tuple)
    assert list(back["state"]) == list(state["state"]) == [0, 1, 2, 3]  # integer keys
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            got = back["state"][pid][key]
            assert got.dtype == value.dtype and torch.equal(got, value)

    # Through the files, then a resumed optimizer steps exactly like the original.
    s_tensors, s_skeleton = flatten_state(sched.state_dict())
    save_checkpoint(
        tmp_path / "c",
        {"model": net.state_dict(), "optimizer": tensors, "scheduler": s_tensors},
        {"optimizer": skeleton, "scheduler": s_skeleton},
    )
    t, meta = load_checkpoint(tmp_path / "c")
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net2.load_state_dict(t["model"])
    opt2 = torch.optim.AdamW(
        [{"params": net2[0].parameters()}, {"params": net2[1].parameters()}], lr=1.0, weight_decay=0.0
    )
    opt2.load_state_dict(unflatten_state(t["optimizer"], meta["optimizer"]))
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    sched2.load_state_dict(unflatten_state(t["scheduler"], meta["scheduler"]))
    assert sched2.state_dict() == sched.state_dict()
    x = torch.randn(5, 4)
    for n, o, s in ((net, opt, sched), (net2, opt2, sched2)):
        n(x).square().mean().backward()
        o.step()
        s.step()
    for p, p2 in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, p2)


def test_flatten_rejects_unknown_types():
    with pytest.raises(TypeError, match="a.b"):
        flatten_state({"a": {"b": {1, 2}}})


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in the legacy state
    tensors, skeleton = flatten_state(rng_state())
    save_checkpoint(tmp_path / "rng", {"rng": tensors}, {"rng": skeleton})
    expected = (torch.rand(3), random.random(), np.random.normal(), np.random.rand())

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    t, meta = load_checkpoint(tmp_path / "rng")
    set_rng_state(unflatten_state(t["rng"], meta["rng"]))
    got = (torch.rand(3), random.random(), np.random.normal(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_corrupt_checkpoint_files_are_named(tmp_path, capsys):
    """A truncated .safetensors or a garbage .json: one line naming the file (CLI exit 2)."""
    from iqpir.checkpoint import CorruptCheckpointError
    from iqpir.cli import main
    from iqpir.io import write_image

    torch.manual_seed(0)
    cfg = run_cfg(2)
    run = tmp_path / "run"
    run.mkdir()
    stem = save_checkpoint(run, {"model": build_restorer(cfg.model).state_dict()},
                           {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    write_image(tmp_path / "in.png", torch.rand(3, 32, 32))
    args = ["restore", str(tmp_path / "in.png"), "--checkpoint", str(run), "--out", str(tmp_path / "out"),
            "--device", "cpu"]
    tensors, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    good_tensors, good_json = tensors.read_bytes(), sidecar.read_text()
    damage = {
        "tensors cut in the data": (tensors, good_tensors[: len(good_tensors) // 2]),
        "tensors cut in the header": (tensors, good_tensors[:20]),
        "tensors empty": (tensors, b""),
        "json garbage": (sidecar, b"{\"format\": \"iqpir-checkpoint\", "),
        "json not an object": (sidecar, b"[1, 2]"),
        "json not text": (sidecar, b"\xff\xfe\x00garbage"),
    }
    for what, (file, data) in damage.items():
        tensors.write_bytes(good_tensors)
        sidecar.write_text(good_json)
        file.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=re.escape(str(file))):
            load_checkpoint(run)
        assert main(args) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(file) in err[0] and "Traceback" not in err[0], (what, err)


def test_unknown_config_key_is_named():
    with pytest.raises(C.ConfigError, match="model.alpah"):
        C.from_dict({"model": {"alpah": 1}})


def test_checkpoint_config_must_rebuild(tmp_path):
    cfg = C.to_dict(run_cfg(2))
    cfg["model"]["alpah"] = 1.0  # e.g. written by a newer version with a key we do not know
    save_checkpoint(tmp_path / "c", {"model": {}}, {"config": cfg})
    with pytest.raises(C.ConfigError, match="model.alpah"):
        load_model(tmp_path / "c")
    save_checkpoint(tmp_path / "d", {"model": {}}, {})
    with pytest.raises(ValueError, match="no config"):
        load_model(tmp_path / "d")
