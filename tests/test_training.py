"""The training loop: both stages run, resume is exact, signals and NaNs stop cleanly, DDP == 1 process."""

from __future__ import annotations

import csv
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.cli import main
from iqpir.io import write_image
from iqpir.training.loop import lr_scale, positions, train
from iqpir.training.distributed import DistInfo

# 32x32 crops, 8x8 latent: a step takes a few tens of milliseconds on 2 cores.
SMALL = [
    "model.image_size=32",
    "model.base_channels=16",
    "model.latent_channels=32",
    "model.codebook_size=64",
    "model.transformer.width=32",
    "model.transformer.heads=2",
    "model.transformer.mlp=64",
    "model.disc_channels=16",
    "train.batch_size=2",
    "train.log_every=1",
    "train.ckpt_every=100",
    "iqa.metrics=[piqe]",
]


def small_cfg(stage: int, *extra: str) -> C.RunConfig:
    return C.load(preset="tiny", overrides=[*SMALL, f"train.stage={stage}", *extra])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six 96x96 synthetic photos: smooth gradients, edges and texture."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    for i in range(6):
        base = torch.stack([xx * (i + 1) / 6, yy, (xx + yy) / 2])
        stripes = 0.2 * torch.sin((xx * 20 + yy * 7 * i) * 3.14)[None]
        img = (base + stripes + 0.05 * torch.rand(3, 96, 96, generator=g)).clamp(0, 1)
        write_image(root / f"img{i}.png", img)
    return root


def read_metrics(run):
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def stage1_run(image_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "s1"
    cfg = small_cfg(1, "train.steps=4", "train.gan_start_step=3")
    result = train(cfg, image_dir, run, device="cpu", progress=False)
    assert result.completed and result.step == 4
    return run


def test_stage1_writes_run_folder(stage1_run):
    rows = read_metrics(stage1_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "l1", "codebook_common", "codebook_hq", "gan", "disc"} <= set(rows[0])
    assert float(rows[0]["gan"]) == 0.0 and float(rows[3]["disc"]) > 0.0  # the GAN starts at step 3
    assert (stage1_run / "config.yaml").is_file() and (stage1_run / "scores.csv").is_file()
    model, cfg = ckpt.load_model(stage1_run)
    assert cfg.train.stage == 1 and type(model).__name__ == "VQAutoEncoder"


def test_stage2_trains_all_terms(stage1_run, image_dir, tmp_path):
    cfg = small_cfg(2, "train.steps=3", "train.quality_start_step=2")
    result = train(cfg, image_dir, tmp_path / "s2", stage1=stage1_run, device="cpu", progress=False)
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


def test_stage2_needs_stage1(image_dir, tmp_path):
    with pytest.raises(ValueError, match="--stage1"):
        train(small_cfg(2, "train.steps=1"), image_dir, tmp_path / "x", device="cpu", progress=False)


def test_resume_is_exact(image_dir, tmp_path):
    """A run stopped at step 3 and resumed logs the same losses at steps 4..6 as one uninterrupted run."""
    cfg = small_cfg(1, "train.steps=6", "train.gan_start_step=2", "train.lr_schedule=cosine", "train.min_lr=1e-5")
    train(cfg, image_dir, tmp_path / "full", device="cpu", progress=False)
    stopped = train(cfg, image_dir, tmp_path / "part", device="cpu", progress=False, stop_at_step=3)
    assert not stopped.completed and stopped.step == 3
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, image_dir, tmp_path / "part", device="cpu", progress=False)
    resumed = train(cfg, image_dir, tmp_path / "part", device="cpu", progress=False, resume=True,
                    scores=tmp_path / "part" / "scores.csv")
    assert resumed.completed
    assert read_metrics(tmp_path / "full") == [
        {**r, "seconds": f} for r, f in zip(read_metrics(tmp_path / "part"), [r["seconds"] for r in read_metrics(tmp_path / "full")])
    ]
    a, _ = ckpt.load_checkpoint(tmp_path / "full")
    b, _ = ckpt.load_checkpoint(tmp_path / "part")
    for group in ("model", "extra.discriminator"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)


def test_sigterm_writes_a_checkpoint(image_dir, tmp_path, monkeypatch):
    from iqpir.training import tasks

    original = tasks.Stage1Task.losses

    def losses(self, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, step)

    monkeypatch.setattr(tasks.Stage1Task, "losses", losses)
    result = train(small_cfg(1, "train.steps=10"), image_dir, tmp_path / "r", device="cpu", progress=False)
    assert not result.completed and result.step == 2
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "r")] == [2]


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(image_dir, tmp_path, monkeypatch):
    from iqpir.training import tasks

    original = tasks.Stage1Task.losses

    def losses(self, batch, step):
        terms = original(self, batch, step)
        if step == 2:
            terms["codebook_hq"] = terms["codebook_hq"] * float("nan")
        return terms

    monkeypatch.setattr(tasks.Stage1Task, "losses", losses)
    cfg = small_cfg(1, "train.steps=5", "train.ckpt_every=1")
    result = train(cfg, image_dir, tmp_path / "r", device="cpu", progress=False)
    assert not result.completed and result.step == 2
    assert "codebook_hq" in result.reason
    _, meta = ckpt.load_checkpoint(tmp_path / "r")
    assert meta["step"] == 2


def test_lr_schedules():
    t = small_cfg(1, "train.steps=100", "train.lr_schedule=cosine", "train.lr=1e-3", "train.min_lr=1e-4").train
    assert lr_scale(t, 0) == pytest.approx(1.0) and lr_scale(t, 100) == pytest.approx(0.1)
    m = small_cfg(1, "train.lr_schedule=multistep", "train.milestones=[2,4]", "train.gamma=0.5").train
    assert [lr_scale(m, s) for s in (0, 2, 4)] == [1.0, 0.5, 0.25]


def test_positions_partition_the_global_batch():
    t = small_cfg(1, "train.batch_size=2", "train.grad_accum=2").train
    one = C.load(preset="tiny", overrides=["train.batch_size=4", "train.grad_accum=2"]).train
    ranks = [positions(3, 1, t, DistInfo(r, 2, r, torch.device("cpu"))) for r in range(2)]
    assert ranks[0] + ranks[1] == positions(3, 1, one, DistInfo(0, 1, 0, torch.device("cpu")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, data, run, stage1, scores):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(C.from_dict(cfg_dict), data, run, stage1=stage1, device="cpu", progress=False, scores=scores)


def test_two_process_ddp_equals_one_process(stage1_run, image_dir, tmp_path):
    """2 ranks x batch 1 log the same losses and end with the same weights as 1 rank x batch 2 (gloo, CPU).

    Adam divides each gradient by its running magnitude, so elements whose gradient is float
    noise (~1e-9; e.g. biases feeding a GroupNorm, which cancels them) take full-size steps
    in a noise-dependent direction. Hence biases are left out and a few weight elements
    (< 0.1%) may differ; a broken gradient average changes almost all of them. The quality
    loss is off: NIQE amplifies the 1e-6 differences between batch sizes in the convolutions.
    """
    scores = stage1_run / "scores.csv"
    base = ["train.steps=3", "train.quality_start_step=100"]
    single = small_cfg(2, *base, "train.batch_size=2")
    train(single, image_dir, tmp_path / "one", stage1=stage1_run, device="cpu", progress=False, scores=scores)
    double = small_cfg(2, *base, "train.batch_size=1")
    mp.spawn(_ddp_worker, args=(2, _free_port(), C.to_dict(double), str(image_dir), str(tmp_path / "two"),
                                str(stage1_run), str(scores)), nprocs=2, join=True)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for r1, r2 in zip(one, two):
        for key in ("loss", "feat", "index_common", "index_hq"):
            assert float(r1[key]) == pytest.approx(float(r2[key]), rel=1e-5), key
    a, _ = ckpt.load_checkpoint(tmp_path / "one")
    b, meta = ckpt.load_checkpoint(tmp_path / "two")
    assert meta["step"] == 3
    weights = [k for k, v in a["model"].items() if v.ndim > 1]
    assert len(weights) > 20
    close = total = 0
    for k in weights:
        close += torch.isclose(a["model"][k], b["model"][k], rtol=1e-4, atol=2e-6).sum().item()
        total += a["model"][k].numel()
    assert close / total > 0.999


def test_cli_train_and_refusals(stage1_run, image_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\ntrain:\n  stage: 1\n")
    args = ["train", str(cfg), "--data", str(image_dir), "--out", str(tmp_path / "r"), "--steps", "1",
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


def test_stage2_may_change_stage2_settings_but_not_stage1_ones(stage1_run, image_dir, tmp_path):
    ok = small_cfg(2, "train.steps=1", "model.quality_embedding=continuous", "model.transformer.layers=1",
                   "model.gradient_path=soft")
    assert train(ok, image_dir, tmp_path / "a", stage1=stage1_run, device="cpu", progress=False).completed
    bad = small_cfg(2, "train.steps=1", "model.codebook_size=32")
    with pytest.raises(ValueError, match=r"model\.codebook_size"):
        train(bad, image_dir, tmp_path / "b", stage1=stage1_run, device="cpu", progress=False)
