"""How codes learn (model.codebook_update / codebook_restart) and the stage-2 fidelity term
(train.fidelity): the invariants a short demo run relies on."""

from __future__ import annotations

import pytest
import torch

from iqpir import config as C
from iqpir.models import build_restorer, build_vqgan
from iqpir.models.quantizer import DualCodebookQuantizer, VectorQuantizer
from iqpir.training import tasks

from train_helpers import small_cfg


def _z(n: int = 2, dim: int = 4, size: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, size, size, generator=torch.Generator().manual_seed(seed), requires_grad=True)


@pytest.mark.parametrize("update,restart", [("ema", 0.0), ("ema", 0.5), ("loss", 0.5)])
def test_output_is_the_lookup_of_the_returned_indices(update, restart):
    vq = VectorQuantizer(8, 4, update=update, decay=0.5, restart=restart).train()
    out = vq(_z())
    # the straight-through z + sg(z_q - z) rounds in the last bit
    torch.testing.assert_close(out.quantized.detach(), vq.lookup(out.indices), rtol=0, atol=1e-6)
    # ... and those indices are the nearest codes of the codebook as it now is
    assert torch.equal(out.indices, vq.nearest(_z().detach()))


def test_ema_with_no_memory_puts_each_used_code_on_the_mean_of_its_vectors():
    vq = VectorQuantizer(6, 4, update="ema", decay=0.0).train()
    z = _z(seed=1)
    before = vq.nearest(z.detach())
    vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    for k in before.unique():
        # Laplace smoothing moves the count by ~1e-5 relative
        torch.testing.assert_close(vq.codebook[k].detach(), flat[before.flatten() == k].mean(0), rtol=1e-4, atol=1e-5)


def test_ema_moving_average_weights_old_and_new_by_the_decay():
    vq = VectorQuantizer(1, 2, update="ema", decay=0.75).train()  # one code: every vector is its
    with torch.no_grad():
        vq.codebook.fill_(0.0)
        vq.code_sum.fill_(0.0)  # usage starts at 1: the first average is 0.25 * mean / (0.75 + 0.25 n) * n
    z = torch.ones(1, 2, 2, 2, requires_grad=True)  # four vectors (1, 1)
    vq(z)
    usage = 0.75 * 1 + 0.25 * 4
    torch.testing.assert_close(vq.usage, torch.tensor([usage]))
    torch.testing.assert_close(vq.codebook.detach(), torch.full((1, 2), 0.25 * 4 / usage), rtol=1e-4, atol=0)


def test_codes_do_not_move_in_eval_mode_or_without_grad():
    vq = VectorQuantizer(8, 4, update="ema", decay=0.5, restart=0.9)
    before = vq.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    vq.eval()(_z())
    with torch.no_grad():
        vq.train()(_z())
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dead_codes_restart_onto_encoder_outputs():
    vq = VectorQuantizer(8, 4, update="loss", decay=0.0, restart=0.5).train()
    with torch.no_grad():
        vq.codebook.fill_(100.0)
        vq.codebook[0].fill_(0.0)  # every vector goes to code 0; codes 1..7 are dead
    z = _z(seed=2)
    vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    for k in range(1, 8):
        assert (flat == vq.codebook[k].detach()).all(dim=1).any(), f"code {k} was not moved onto a batch vector"
    assert vq.codebook.requires_grad  # "loss": the codes still learn by gradient


def test_hq_codebook_learns_only_from_the_masked_samples():
    q = DualCodebookQuantizer(8, 4, threshold=0.7, update="ema", decay=0.0).train()
    hq_before = q.hq.codebook.detach().clone()
    common_before = q.common.codebook.detach().clone()
    q(_z(), torch.tensor([0.1, 0.2]))  # both below S_thr: no HQ+ sample
    assert torch.equal(q.hq.codebook.detach(), hq_before)
    assert not torch.equal(q.common.codebook.detach(), common_before)


def test_official_update_adds_no_state():
    """The paper preset's quantizer keeps the official state dict (no buffers), so released
    weights load as they are."""
    keys = set(build_vqgan(C.load(preset="tiny").model).quantizer.state_dict())
    assert keys == {"common.codebook", "hq.codebook"}
    assert C.RunConfig().model.codebook_update == "loss" and C.RunConfig().model.codebook_restart == 0.0
    assert C.RunConfig().model.final_norm and C.RunConfig().train.fidelity == 0.0


def test_final_norm_off_removes_both_norms_only():
    on = build_vqgan(C.load(preset="tiny").model)
    off = build_vqgan(C.load(preset="tiny", overrides=["model.final_norm=false"]).model)
    gone = set(on.state_dict()) - set(off.state_dict())
    assert gone == {"encoder.norm_out.weight", "encoder.norm_out.bias", "decoder.norm_out.weight", "decoder.norm_out.bias"}
    assert set(off.state_dict()) <= set(on.state_dict())


# --------------------------------------------------------------------------------------
# train.fidelity: the CFT blocks learn in stage 2 from an L1 term on the image restored at w
# --------------------------------------------------------------------------------------


def test_fidelity_needs_cft_blocks_and_a_weight_in_range():
    with pytest.raises(C.ConfigError, match="cft_resolutions"):
        small_cfg(2, "train.fidelity=1.0")
    with pytest.raises(C.ConfigError, match=r"train.fidelity=1.5"):
        small_cfg(2, "train.fidelity=1.5", "model.cft_resolutions=[32]")


@pytest.mark.parametrize("fidelity", [0.0, 1.0])
def test_fidelity_term_trains_the_cft_blocks_and_nothing_frozen(fidelity):
    cfg = small_cfg(2, f"train.fidelity={fidelity}", "model.cft_resolutions=[32]", "train.quality_weight=0")
    task = tasks.Stage2Task(cfg, torch.device("cpu"), stage1=None)
    g = torch.Generator().manual_seed(0)
    batch = {"hq": torch.rand(2, 3, 32, 32, generator=g), "lq": torch.rand(2, 3, 32, 32, generator=g),
             "quality": torch.tensor([0.3, 0.9])}
    terms = task.losses(batch, step=0)
    assert ("fidelity_l1" in terms) == (fidelity > 0)
    sum(terms.values()).backward()
    net = task.generator
    cft_grads = [p.grad for p in net.cft.parameters()]
    if fidelity:
        assert all(g is not None and g.abs().sum() > 0 for g in cft_grads)
        restored = net(batch["lq"], batch["quality"], fidelity=fidelity).restored
        torch.testing.assert_close(terms["fidelity_l1"], cfg.train.l1_weight * (restored - batch["hq"]).abs().mean(),
                                   rtol=1e-5, atol=1e-6)
    else:
        assert all(g is None for g in cft_grads)
    for name in ("decoder", "quantizer"):
        assert all(p.grad is None for p in getattr(net, name).parameters()), name
    assert all(p.grad is None for p in task.target.parameters())


def test_restorer_with_trained_fidelity_keeps_cft_out_at_w_zero():
    """w = 0 skips the blocks: the restoration is the pure codebook prior whatever they learnt."""
    cfg = small_cfg(2, "model.cft_resolutions=[32]")
    net = build_restorer(cfg.model).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(x, 0.5).restored
        for p in net.cft.parameters():
            p.add_(1.0)
        assert torch.equal(net(x, 0.5).restored, ref)
        assert not torch.equal(net(x, 0.5, fidelity=1.0).restored, ref)
