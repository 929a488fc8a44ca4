"""The training loop: both stages run, resume is exact (EMA too), signals and NaNs stop cleanly, the quality loss."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from train_helpers import SMALL, read_metrics, small_cfg

from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.cli import main
from iqpir.training.distributed import DistInfo
from iqpir.training.data import positions
from iqpir.training.loop import EMA, TrainOptions, lr_scale, run, train


def test_stage1_writes_run_folder(stage1_run):
    rows = read_metrics(stage1_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "l1", "codebook_common", "codebook_hq", "gan", "disc"} <= set(rows[0])
    assert float(rows[0]["gan"]) == 0.0 and float(rows[3]["disc"]) > 0.0  # the GAN starts at step 3
    assert (stage1_run / "config.yaml").is_file() and (stage1_run / "scores.csv").is_file()
    model, cfg = ckpt.load_model(stage1_run)
    assert cfg.train.stage == 1 and type(model).__name__ == "VQAutoEncoder"


def test_stage2_trains_all_terms(stage1_run, train_images, tmp_path):
    cfg = small_cfg(2, "train.steps=3", "train.quality_start_step=2")
    result = train(cfg, train_images, tmp_path / "s2", stage1=stage1_run, device="cpu", progress=False)
    assert result.completed
    rows = read_metrics(tmp_path / "s2")
    assert {"feat", "index_common", "index_hq", "quality"} <= set(rows[0])
    assert float(rows[0]["quality"]) == 0.0 and float(rows[1]["quality"]) > 0.0
    # the decoder and codebooks stay those of stage 1
    tensors, _ = ckpt.load_checkpoint(stage1_run)
    s1 = tensors["model"]
    s2, _ = ckpt.load_checkpoint(tmp_path / "s2")
    for key in ("decoder.conv_out.weight", "quantizer.common.codebook"):
        matches = [k for k in s2["model"] if k.endswith(key)]
        assert matches, key
        assert torch.equal(s2["model"][matches[0]], s1[[k for k in s1 if k.endswith(key)][0]])


def test_stage2_needs_stage1(train_images, tmp_path):
    with pytest.raises(ValueError, match="--stage1"):
        train(small_cfg(2, "train.steps=1"), train_images, tmp_path / "x", device="cpu", progress=False)


def test_resume_is_exact(train_images, tmp_path):
    """A run stopped at step 2 and resumed logs the same losses at steps 3..4 as one uninterrupted run,
    and ends with the same weights, discriminator and EMA. The GAN trains from step 2, so the
    discriminator and its optimiser have state to carry over; two resumed steps, so the step
    after the first resumed one (schedule, data position) is checked too."""
    cfg = small_cfg(1, "train.steps=4", "train.gan_start_step=1", "train.lr_schedule=cosine", "train.min_lr=1e-5",
                    "train.ema_decay=0.5")
    train(cfg, train_images, tmp_path / "full", device="cpu", progress=False)
    stopped = train(cfg, train_images, tmp_path / "part", device="cpu", progress=False, stop_at_step=2)
    assert not stopped.completed and stopped.step == 2
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, train_images, tmp_path / "part", device="cpu", progress=False)
    resumed = train(cfg, train_images, tmp_path / "part", device="cpu", progress=False, resume=True,
                    scores=tmp_path / "part" / "scores.csv")
    assert resumed.completed
    assert read_metrics(tmp_path / "full") == [
        {**r, "seconds": f} for r, f in zip(read_metrics(tmp_path / "part"), [r["seconds"] for r in read_metrics(tmp_path / "full")])
    ]
    a, _ = ckpt.load_checkpoint(tmp_path / "full")
    b, _ = ckpt.load_checkpoint(tmp_path / "part")
    for group in ("model", "ema", "extra.discriminator"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    assert not torch.equal(a["ema"]["encoder.conv_in.weight"], a["model"]["encoder.conv_in.weight"])


def test_sigterm_writes_a_checkpoint(train_images, tmp_path, monkeypatch):
    from iqpir.training import tasks

    original = tasks.Stage1Task.losses

    def losses(self, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, step)

    monkeypatch.setattr(tasks.Stage1Task, "losses", losses)
    result = train(small_cfg(1, "train.steps=10"), train_images, tmp_path / "r", device="cpu", progress=False)
    assert not result.completed and result.step == 2
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "r")] == [2]


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(train_images, tmp_path, monkeypatch):
    from iqpir.training import tasks

    original = tasks.Stage1Task.losses

    def losses(self, batch, step):
        terms = original(self, batch, step)
        if step == 2:
            terms["codebook_hq"] = terms["codebook_hq"] * float("nan")
        return terms

    monkeypatch.setattr(tasks.Stage1Task, "losses", losses)
    cfg = small_cfg(1, "train.steps=5", "train.ckpt_every=1")
    result = train(cfg, train_images, tmp_path / "r", device="cpu", progress=False)
    assert not result.completed and result.step == 2
    assert "codebook_hq" in result.reason
    _, meta = ckpt.load_checkpoint(tmp_path / "r")
    assert meta["step"] == 2


def test_ema_update():
    """shadow <- decay * shadow + (1 - decay) * weight for trained parameters; frozen ones and buffers copied."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net[1].weight.requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    ema = EMA(net, decay=0.75)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
        net[1].running_mean.fill_(5.0)
    ema.update(net)
    shadow = ema.state_dict()
    assert torch.equal(shadow["0.weight"], torch.full((2, 2), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(shadow["0.bias"], torch.full((2,), 1.5))
    assert torch.equal(shadow["1.weight"], torch.full((2,), 3.0))  # frozen: follows the model
    assert torch.equal(shadow["1.running_mean"], torch.full((2,), 5.0))
    ema.update(net)
    assert torch.equal(shadow["0.bias"], torch.full((2,), 0.75 * 1.5 + 0.25 * 3.0))
    assert shadow["0.bias"].data_ptr() != net[0].bias.data_ptr()


def test_quality_loss_is_one_minus_q_and_descends_to_higher_quality():
    """The stage-2 term is w * (1 - Q(restored)) (paper Eq. 9), and its gradient at the restored
    image points to higher Q: a small step against it raises the ensemble's score."""
    from iqpir.training.tasks import Stage2Task, quality_input

    cfg = small_cfg(2, "train.quality_start_step=1", "train.quality_weight=0.3")
    torch.manual_seed(0)
    task = Stage2Task(cfg, torch.device("cpu"), stage1=None)
    restored = []

    def keep(module, inputs, out):  # the restored image, with its gradient kept
        out.retain_grad()
        restored.append(out)

    task.generator.decoder.register_forward_hook(keep)
    g = torch.Generator().manual_seed(1)
    lq = torch.rand(2, 3, 32, 32, generator=g)
    batch = {"hq": torch.rand(2, 3, 32, 32, generator=g), "lq": lq, "quality": torch.tensor([0.3, 0.9])}
    terms = task.losses(batch, step=0)
    q = task.quality_model(quality_input(restored[-1].detach().float().clamp(0, 1)))
    assert q.shape == (2,) and 0 < float(q.min()) and float(q.max()) < 1
    torch.testing.assert_close(terms["quality"], 0.3 * (1 - q).mean(), rtol=1e-5, atol=0)
    assert task.losses(batch, step=-1)["quality"] == 0  # before train.quality_start_step

    terms["quality"].backward()
    x = restored[0]
    step = x.grad / x.grad.abs().amax()
    with torch.no_grad():
        before = task.quality_model(quality_input(x.clamp(0, 1)))
        after = task.quality_model(quality_input((x - 0.02 * step).clamp(0, 1)))
    assert (after > before).all(), (before, after)


def test_lr_schedules():
    t = small_cfg(1, "train.steps=100", "train.lr_schedule=cosine", "train.lr=1e-3", "train.min_lr=1e-4").train
    assert lr_scale(t, 0) == pytest.approx(1.0) and lr_scale(t, 100) == pytest.approx(0.1)
    m = small_cfg(1, "train.lr_schedule=multistep", "train.milestones=[2,4]", "train.gamma=0.5").train
    assert [lr_scale(m, s) for s in (0, 2, 4)] == [1.0, 0.5, 0.25]


def test_lr_schedules_at_their_edges():
    """Steps 0 and 1, the last warm-up step, the first after it, the last step: each value by hand."""
    w = small_cfg(1, "train.steps=20", "train.warmup_steps=4", "train.lr_schedule=cosine", "train.lr=1.0",
                  "train.min_lr=0.1").train
    last = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))  # step 19: 15 of the 16 cosine steps done
    assert [lr_scale(w, s) for s in (0, 1, 3, 4, 19, 20)] == pytest.approx([0.25, 0.5, 1.0, 1.0, last, 0.1])
    m = small_cfg(1, "train.steps=12", "train.warmup_steps=2", "train.lr_schedule=multistep",
                  "train.milestones=[5,10]", "train.gamma=0.1").train
    assert [lr_scale(m, s) for s in (0, 1, 2, 4, 5, 9, 10, 11)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    c = small_cfg(1, "train.steps=10", "train.warmup_steps=3", "train.lr_schedule=constant").train
    assert [lr_scale(c, s) for s in (0, 1, 2, 3, 9)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


class _NoisyTask:
    """One linear layer fitted to noise drawn from the global RNG, as dropout draws it."""

    arch, discriminator, loss_names, aux_names = "toy", None, ["mse"], []

    def __init__(self):
        self.generator = torch.nn.Linear(4, 1)

    def losses(self, batch, step):
        return {"mse": (self.generator(batch["x"]) - torch.randn(len(batch["x"]), 1)).square().mean()}

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    def meta(self):
        return {}


class _Ramp:
    def batches(self, first_step):
        # a DataLoader draws its workers' base seed from the global RNG when it starts
        loader = torch.utils.data.DataLoader(range(first_step, 1000), batch_size=None)
        return ({"x": torch.full((2, 4), float(s))} for s in loader)


def test_resume_restores_the_global_rng_and_the_clock(tmp_path):
    """Any task, any batch source: the loop restores the global RNG states with the weights and
    Adam's moments (a loss that draws from it logs the same values resumed), and the run's time
    adds up over its starts."""
    cfg = small_cfg(1, "train.steps=4", "train.lr_schedule=cosine", "train.min_lr=1e-5")
    opts = TrainOptions(device="cpu", progress=False)
    setup = lambda info: (_NoisyTask(), _Ramp())  # noqa: E731
    run(cfg, setup, tmp_path / "full", opts)
    run(cfg, setup, tmp_path / "part", dataclasses.replace(opts, stop_at_step=2))
    sidecar = ckpt.resolve_checkpoint(tmp_path / "part").with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "elapsed": {"wall_s": 1000.0, "cpu_s": 1000.0}}))
    run(cfg, setup, tmp_path / "part", dataclasses.replace(opts, resume=True))
    losses = [[r["mse"] for r in read_metrics(tmp_path / name)] for name in ("full", "part")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, _ = ckpt.load_checkpoint(tmp_path / "full")
    b, meta = ckpt.load_checkpoint(tmp_path / "part")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert 1000 < meta["elapsed"]["wall_s"] < 1100 and meta["elapsed"]["cpu_s"] > 1000  # the first start's time, faked


def test_positions_partition_the_global_batch():
    t = small_cfg(1, "train.batch_size=2", "train.grad_accum=2").train
    one = C.load(preset="tiny", overrides=["train.batch_size=4", "train.grad_accum=2"]).train
    ranks = [positions(3, 1, t, DistInfo(r, 2, r, torch.device("cpu"))) for r in range(2)]
    assert ranks[0] + ranks[1] == positions(3, 1, one, DistInfo(0, 1, 0, torch.device("cpu")))


def test_cli_train_and_refusals(stage1_run, train_images, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\ntrain:\n  stage: 1\n")
    args = ["train", str(cfg), "--data", str(train_images), "--out", str(tmp_path / "r"), "--steps", "1",
            "--device", "cpu", *sum((["--set", s] for s in SMALL), [])]
    assert main(args) == 0
    assert main(args) == 2  # the run folder holds a checkpoint and --resume was not given
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(cfg), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "q")]) == 2


def test_quality_coverage_warns_about_untrained_bins():
    from iqpir.training.loop import quality_coverage

    m = C.from_preset("tiny").model
    assert quality_coverage(m, [i / 10 + 0.05 for i in range(10)]) == []
    (msg,) = quality_coverage(m, [0.31, 0.45, 0.52])
    assert "[0.90, 1.00]" in msg and "S = 1.0" in msg and "[0.30, 0.40)" not in msg
    m.quality_embedding = "continuous"
    assert quality_coverage(m, [0.5]) == []


def test_stage2_may_change_stage2_settings_but_not_stage1_ones(stage1_run, train_images, tmp_path):
    ok = small_cfg(2, "train.steps=1", "model.quality_embedding=continuous", "model.transformer.layers=1",
                   "model.gradient_path=soft")
    assert train(ok, train_images, tmp_path / "a", stage1=stage1_run, device="cpu", progress=False).completed
    bad = small_cfg(2, "train.steps=1", "model.codebook_size=32")
    with pytest.raises(ValueError, match=r"model\.codebook_size"):
        train(bad, train_images, tmp_path / "b", stage1=stage1_run, device="cpu", progress=False)
