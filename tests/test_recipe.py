"""Training-recipe fidelity: the paper configs train the way the official recipe does.

The official recipe is IQPIR's fork of CodeFormer (VQGANModel, CodeFormerIdxModel,
basicsr/losses, options/*.yml); docs/recipe.md lists it and every deliberate difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from iqpir import config as C
from iqpir.io import load_rgb, write_image
from iqpir.iqa.table import ScoreTable, read_score_table, score_files
from iqpir.training import loop, tasks
from iqpir.training.perceptual import IMAGENET_MEAN, IMAGENET_STD, PerceptualLoss
from train_helpers import SMALL_MODEL

ROOT = Path(__file__).parent.parent
ASSETS = Path(__file__).parent / "assets"

SMALL = [*SMALL_MODEL, "train.perceptual_weight=0"]


def small_cfg(stage: int, *extra: str) -> C.RunConfig:
    return C.load(preset="tiny", overrides=[*SMALL, f"train.stage={stage}", *extra])


def values(task, b: dict, step: int) -> dict[str, torch.Tensor]:
    """task.losses without the graph."""
    return {k: v.detach() for k, v in task.losses(b, step).items()}


def batch(n: int = 2, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hq = torch.rand(n, 3, size, size, generator=g)
    return {"hq": hq, "lq": (hq + 0.1 * torch.randn(hq.shape, generator=g)).clamp(0, 1),
            "quality": torch.tensor([0.9, 0.3])[:n]}


# --------------------------------------------------------------------------------------
# The paper configs are the official recipe
# --------------------------------------------------------------------------------------


def test_paper_stage1_resolves_to_the_official_recipe():
    cfg = C.load(ROOT / "configs" / "paper-stage1.yaml")
    m, t = cfg.model, cfg.train
    assert (m.hq_threshold, m.alpha, m.beta, m.beta_on, m.dual_codebook) == (0.70, 0.8, 0.25, "codebook", True)
    assert (t.lr, t.disc_lr, t.betas, t.weight_decay, t.batch_size, t.ema_decay) == (7e-5, 7e-5, [0.9, 0.99], 0.0, 4, 0.995)
    assert (t.lr_schedule, t.min_lr, t.cosine_steps, t.steps, t.warmup_steps) == ("cosine", 6e-5, 1_600_000, 200_000, 0)
    assert (t.l1_weight, t.l1_range, t.perceptual_weight, t.perceptual_input) == (1.0, "signed", 1.0, "imagenet")
    assert (t.gan_weight, t.gan_weight_max, t.gan_start_step) == (0.8, 1.0, 30_001)
    assert (t.codebook_weight, t.hq_codebook_weight, t.codebook_init) == (1.0, 1.0, "uniform")
    # the file states what the paper preset (the dataclass defaults) already holds
    assert cfg == C.from_dict({"train": {"stage": 1, "cosine_steps": 1_600_000, "ckpt_every": 5000, "log_every": 100}})


def test_paper_stage2_resolves_to_the_official_recipe():
    t = C.load(ROOT / "configs" / "paper-stage2.yaml").train
    assert (t.lr, t.betas, t.lr_schedule, t.milestones, t.gamma, t.steps) == (
        1e-4, [0.9, 0.99], "multistep", [400_000, 450_000], 0.5, 250_000)
    assert (t.batch_size, t.ema_decay, t.feat_weight, t.index_weight) == (4, 0.995, 1.0, 0.5)
    assert (t.quality_weight, t.quality_start_step) == (0.1, 100_000)


def test_paper_network_initialises_like_the_official_one():
    """Official: score embedding N(0, 1) (nn.Embedding), position embedding zeros, PyTorch's default
    Linear init in the Transformer, codebooks uniform(-1/K, 1/K); AdaIN off in training."""
    from iqpir.models import build_restorer

    cfg = C.load(ROOT / "configs" / "paper-stage2.yaml")
    assert (cfg.model.init, cfg.model.adain, cfg.model.cft_resolutions) == ("official", False, [32, 64, 128, 256])
    small = C.from_dict({"model": {"image_size": 64, "channel_mult": [1, 2, 2], "cft_resolutions": [],
                                   "transformer": {"layers": 1}}})
    torch.manual_seed(0)
    net = build_restorer(small.model)
    assert torch.count_nonzero(net.transformer.pos_emb) == 0
    assert 0.9 < float(net.quality_embedding.maps.std()) < 1.1
    k = small.model.codebook_size
    assert float(net.quantizer.common.codebook.abs().max()) <= 1.0 / k
    w = net.transformer.layers[0].mlp[0].weight  # kaiming-uniform bound 1/sqrt(fan_in)
    assert float(w.abs().max()) <= 1.0 / w.shape[1] ** 0.5 and float(w.std()) > 0.02 * 1.2


def test_tiny_keeps_its_small_run_choices():
    cfg = C.from_preset("tiny")
    assert cfg.train.codebook_init == "first_batch"
    assert (cfg.train.l1_range, cfg.train.perceptual_input, cfg.model.beta_on) == ("unit", "lpips", "commitment")
    assert cfg.train.gan_weight_max == 1.0  # the clamp is a bug fix, not a small-run choice


def test_cosine_over_official_period():
    """Step s (from 0) gets BasicSR's CosineAnnealingRestartLR value of iteration s + 1."""
    t = C.load(ROOT / "configs" / "paper-stage1.yaml").train
    for s in (0, 1, 100_000, 199_999):
        official = 6e-5 + 0.5 * (7e-5 - 6e-5) * (1 + math.cos(math.pi * s / 1_600_000))
        assert t.lr * loop.lr_scale(t, s) == pytest.approx(official, rel=1e-12)
    t.cosine_steps = 0  # 0: anneal over train.steps
    assert t.lr * loop.lr_scale(t, t.steps) == pytest.approx(t.min_lr)


# --------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1e-6, 1e-2, 0.5, 1.0, 3.0, 1e3, 1e6])
def test_adaptive_weight_is_clamped_at_one(ratio):
    w = nn.Parameter(torch.ones(4))
    rec = ratio * (w * torch.tensor([1.0, 2.0, 0.0, 0.0])).sum()
    gan = (w * torch.tensor([0.0, 0.0, 1.0, 2.0])).sum()
    expected = ratio * math.sqrt(5) / (math.sqrt(5) + 1e-4)
    assert float(tasks.adaptive_gan_weight(rec, gan, w)) == pytest.approx(min(expected, 1.0), rel=1e-6)


class _WeakCritic(nn.Module):
    """A discriminator whose gradient is tiny, so ||grad rec|| / ||grad gan|| is huge."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3)
        nn.init.constant_(self.conv.weight, 1e-7)

    def forward(self, x):
        return self.conv(x)


def test_gan_term_never_exceeds_0_8_times_the_gan_loss():
    torch.manual_seed(0)
    task = tasks.Stage1Task(small_cfg(1, "train.gan_start_step=0"), torch.device("cpu"))
    task.discriminator = _WeakCritic()
    b = batch()
    terms = values(task, b, 0)
    with torch.no_grad():
        gan = -task.discriminator(task.generator(b["hq"], b["quality"]).reconstruction).mean()
    assert float(terms["gan"] / gan) == pytest.approx(0.8, rel=1e-5)


def test_gan_starts_after_gan_start_step():
    """Official: on when current_iter (counted from 1) > net_d_start_iter, i.e. from 30002."""
    torch.manual_seed(0)
    task = tasks.Stage1Task(small_cfg(1, "train.gan_start_step=3"), torch.device("cpu"))
    b = batch()
    at_start = values(task, b, 2)  # iteration 3
    assert float(at_start["gan"]) == 0.0 and float(at_start["disc"]) == 0.0
    after = values(task, b, 3)  # iteration 4
    assert float(after["disc"]) > 0.0 and float(after["gan"]) != 0.0


def test_l1_range_signed_is_twice_unit():
    torch.manual_seed(0)
    task = tasks.Stage1Task(small_cfg(1, "train.gan_weight=0"), torch.device("cpu"))
    b = batch()
    unit = values(task, b, 0)
    task.cfg.train.l1_range = "signed"
    signed = values(task, b, 0)
    assert float(signed["l1"]) == pytest.approx(2 * float(unit["l1"]), rel=1e-6)
    assert float(signed["codebook_common"]) == pytest.approx(float(unit["codebook_common"]), rel=1e-6)


def test_hq_codebook_weight_scales_only_the_hq_codebook_loss():
    torch.manual_seed(0)
    task = tasks.Stage1Task(small_cfg(1, "train.gan_weight=0"), torch.device("cpu"))
    b = batch()
    one = values(task, b, 0)
    task.cfg.train.hq_codebook_weight = 0.8
    scaled = values(task, b, 0)
    assert float(one["codebook_hq"]) > 0
    assert float(scaled["codebook_hq"]) == pytest.approx(0.8 * float(one["codebook_hq"]), rel=1e-6)
    assert float(scaled["codebook_common"]) == pytest.approx(float(one["codebook_common"]), rel=1e-6)


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, a, b):
        self.seen += [a, b]
        return (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("norm", ["imagenet", "lpips"])
def test_perceptual_input_normalisation(norm):
    x = torch.rand(2, 3, 8, 8)
    rec = _Recorder()
    out = PerceptualLoss(rec, norm)(x, x.flip(0))
    assert out.shape == (2,)
    if norm == "imagenet":  # official: LPIPSLoss(range_norm=True, use_input_norm=True) on [-1, 1] images
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        signed = 2 * x - 1
        expected = ((signed + 1) / 2 - mean) / std
    else:
        expected = 2 * x - 1
    torch.testing.assert_close(rec.seen[0], expected)
    torch.testing.assert_close(rec.seen[1], expected.flip(0))


def test_stage1_passes_perceptual_input_to_the_loss(monkeypatch):
    from iqpir.training import perceptual

    asked = []

    def fake_build(device, input_norm="lpips"):
        asked.append(input_norm)
        return PerceptualLoss(_Recorder(), input_norm), None

    monkeypatch.setattr(perceptual, "build_perceptual", fake_build)
    task = tasks.Stage1Task(small_cfg(1, "train.perceptual_weight=1", "train.perceptual_input=imagenet"),
                            torch.device("cpu"))
    assert asked == ["imagenet"] and "perceptual" in task.loss_names


@pytest.mark.parametrize("init", ["uniform", "first_batch"])
def test_codebook_init_option(init):
    torch.manual_seed(0)
    task = tasks.Stage1Task(small_cfg(1, f"train.codebook_init={init}"), torch.device("cpu"))
    quantizer = task.generator.quantizer
    before = quantizer.common.codebook.detach().clone()
    task.prepare(batch())
    after = quantizer.common.codebook.detach()
    k = after.shape[0]
    if init == "uniform":  # official: nn.Embedding weight uniform(-1/K, 1/K), left as constructed
        assert torch.equal(after, before) and after.abs().max() <= 1.0 / k
    else:
        assert not torch.equal(after, before) and after.abs().max() > 1.0 / k


# --------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------


def test_stage2_targets_are_fp32_under_bf16_autocast():
    """The loop runs task.losses under bf16 autocast on CUDA; the code targets must not change."""
    torch.manual_seed(0)
    task = tasks.Stage2Task(small_cfg(2, "train.quality_weight=0"), torch.device("cpu"), stage1=None)
    b = batch(2, seed=1)
    task.target.quantizer.init_from(task.target.encoder(b["hq"]).detach(), torch.Generator().manual_seed(0))
    fp32 = task.target.code_targets(b["hq"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = task.target.code_targets(b["hq"])
    changed = (bf16.indices_common != fp32.indices_common).float().mean()
    if changed == 0:
        pytest.skip("bf16 autocast changes no index on this CPU: the test would prove nothing")
    seen = []
    original = task.target.code_targets

    def recording(images, *args, **kwargs):
        seen.append(original(images, *args, **kwargs))
        return seen[-1]

    task.target.code_targets = recording
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values(task, b, 0)
    assert torch.equal(seen[0].indices_common, fp32.indices_common)
    assert torch.equal(seen[0].indices_hq, fp32.indices_hq)
    assert seen[0].z_q.dtype == torch.float32


@pytest.fixture(scope="module")
def scored_folder(tmp_path_factory):
    """Three 384x384 training images of distinct quality and their minmax NIQE table."""
    root = tmp_path_factory.mktemp("train")
    i04 = load_rgb(ASSETS / "I04.png")[:, :, :384]
    i06 = load_rgb(ASSETS / "I06.png")[:, :, :384]
    soft = torch.nn.functional.avg_pool2d(i04[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    for name, img in (("a", i04), ("b", i06), ("c", soft)):
        write_image(root / f"{name}.png", img)
    table = root / "scores.csv"
    score_files([str(root)], ["niqe"], str(table), normalization="minmax", progress=False)
    return root, read_score_table(table)


def test_quality_loss_q_equals_table_s_with_minmax(scored_folder):
    """Q of the quality loss (niqe_diff) on a training image is that image's S (niqe, minmax).

    niqe_diff is NIQE computed with smooth operations, not the same metric: on these crops it
    is within 0.05% of niqe, so Q and S agree to a few thousandths, not exactly.
    """
    root, table = scored_folder
    lo, hi = table.constants["niqe"]
    assert hi - lo > 1.0  # a real range: the normalisation matters
    cfg = small_cfg(2, "iqa.metrics=[niqe]", "iqa.normalization=minmax", "iqa.loss_metrics=[niqe_diff]")
    task = tasks.Stage2Task(cfg, torch.device("cpu"), stage1=None, score_table=table)
    q_model = task.quality_model
    assert q_model.normalization == "minmax" and q_model.constants == {"niqe_diff": (lo, hi)}
    images = torch.stack([load_rgb(root / f"{n}.png") for n in "abc"])
    with torch.no_grad():
        q = q_model(images)
    s = torch.tensor([table.quality[str((root / f"{n}.png").resolve())] for n in "abc"])
    assert s.min() == 0.0 and s.max() == 1.0 and 0.05 < float(s.median()) < 0.95
    torch.testing.assert_close(q.float(), s.float(), atol=5e-3, rtol=0)
    assert task.meta()["quality_loss"]["constants"] == {"niqe_diff": [lo, hi]}


def test_quality_loss_without_minmax_constants_is_an_error(scored_folder):
    _, table = scored_folder
    cfg = small_cfg(2, "iqa.normalization=minmax", "iqa.loss_metrics=[niqe_diff]")
    table_without_niqe = read_score_table(table.path)
    table_without_niqe.metrics, table_without_niqe.constants = ["piqe"], {"piqe": (0.0, 50.0)}
    with pytest.raises(ValueError, match=r"niqe_diff has no min-max constants in the score table .*piqe"):
        tasks.quality_loss_ensemble(cfg.iqa, table_without_niqe, "cpu")
    with pytest.raises(ValueError, match="no score table"):
        tasks.quality_loss_ensemble(cfg.iqa, None, "cpu")


def test_fixed_table_keeps_documented_ranges():
    table = ScoreTable(metrics=["niqe", "piqe"], normalization="fixed",
                       constants={"niqe": (0.0, 20.0), "piqe": (0.0, 100.0)})
    q = tasks.quality_loss_ensemble(C.from_preset("tiny").iqa, table, "cpu")
    assert q.normalization == "fixed" and q.constants == {"niqe_diff": (0.0, 20.0)}
    # a table without a sidecar: iqa.normalization, the members' documented ranges
    q = tasks.quality_loss_ensemble(C.from_preset("tiny").iqa, ScoreTable(metrics=["piqe"]), "cpu")
    assert q.normalization == "fixed" and q.constants == {"niqe_diff": (0.0, 20.0)}


def test_train_hands_the_score_table_to_the_task(scored_folder, tmp_path, monkeypatch):
    root, table = scored_folder
    got = {}

    class Stop(Exception):
        pass

    def fake_build_task(cfg, device, stage1=None, score_table=None):
        got["table"] = score_table
        raise Stop

    monkeypatch.setattr(loop, "build_task", fake_build_task)
    cfg = small_cfg(2, "iqa.metrics=[niqe]", "iqa.normalization=minmax")
    with pytest.raises(Stop):
        loop.train(cfg, root, tmp_path / "run", stage1=tmp_path / "unused", scores=table.path,
                   device="cpu", progress=False)
    assert got["table"].constants == table.constants and got["table"].normalization == "minmax"
