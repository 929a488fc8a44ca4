"""The IQPIR networks: quantizers, VQ autoencoder, quality embedding, Transformer, restorer."""

from __future__ import annotations

import dataclasses
import io
import json
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from iqpir import config as C
from iqpir.cli import main as cli_main
from iqpir.models import (
    DualCodebookQuantizer,
    PatchDiscriminator,
    QualityEmbedding,
    Restorer,
    VectorQuantizer,
    build_discriminator,
    build_restorer,
    build_vqgan,
    parameter_counts,
)


def tiny_cfg(**overrides) -> C.ModelConfig:
    """The tiny preset at 32x32 (latent 8x8x64): small enough for gradient tests on 2 cores."""
    cfg = C.from_dict({"preset": "tiny", "model": {"image_size": 32, **overrides}}).model
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------
# VectorQuantizer
# --------------------------------------------------------------------------------------


def test_quantizer_picks_nearest_codes_and_lookup_matches_forward():
    vq = VectorQuantizer(num_codes=32, dim=8)
    torch.nn.init.normal_(vq.codebook)
    z = torch.randn(2, 8, 5, 4)
    out = vq(z)
    assert out.indices.shape == (2, 5, 4) and out.indices.dtype == torch.long
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(flat, vq.codebook).argmin(1).view(2, 5, 4)
    assert torch.equal(out.indices, brute)
    torch.testing.assert_close(vq.lookup(out.indices), out.quantized, rtol=0, atol=1e-6)
    for name in ("codebook_loss", "commitment_loss", "loss"):
        assert getattr(out, name).shape == (2,)


def test_straight_through_passes_the_gradient_unchanged():
    vq = VectorQuantizer(num_codes=16, dim=4)
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    weights = torch.randn(3, 4, 2, 2)
    (vq(z).quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


@pytest.mark.parametrize("beta_on", ["commitment", "codebook"])
def test_beta_placement_weights_the_documented_term(beta_on):
    beta = 0.25
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    vq = VectorQuantizer(num_codes=8, dim=4, beta=beta, beta_on=beta_on)
    torch.nn.init.normal_(vq.codebook)
    out = vq(z)
    out.loss.sum().backward()
    z_q = vq.lookup(out.indices).detach()
    n = 4 * 3 * 3
    # d/dz ||sg(z_q) - z||^2 / n = 2 (z - z_q) / n; the codebook term gives the codes the
    # opposite gradient, summed over the positions that chose each code.
    grad_commit = 2 * (z.detach() - z_q) / n
    grad_codes = torch.zeros_like(vq.codebook).index_add_(
        0, out.indices.flatten(), (-grad_commit).permute(0, 2, 3, 1).reshape(-1, 4)
    )
    w_commit, w_code = (beta, 1.0) if beta_on == "commitment" else (1.0, beta)
    torch.testing.assert_close(z.grad, w_commit * grad_commit)
    torch.testing.assert_close(vq.codebook.grad, w_code * grad_codes)
    torch.testing.assert_close(out.loss, w_code * out.codebook_loss + w_commit * out.commitment_loss)


def test_quantizer_distances_stay_float32_under_autocast():
    vq = VectorQuantizer(num_codes=64, dim=16)
    torch.nn.init.normal_(vq.codebook)
    z = torch.randn(2, 16, 4, 4)
    expected = vq(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq(z).indices, expected)


# --------------------------------------------------------------------------------------
# DualCodebookQuantizer
# --------------------------------------------------------------------------------------


def _dual(**kw) -> DualCodebookQuantizer:
    q = DualCodebookQuantizer(num_codes=16, dim=4, alpha=0.8, threshold=0.7, **kw)
    torch.nn.init.normal_(q.common.codebook)
    if q.hq is not None:
        torch.nn.init.normal_(q.hq.codebook)
    return q


def test_dual_masks_the_hq_branch_per_sample():
    q = _dual()
    z = torch.randn(3, 4, 2, 2)
    quality = torch.tensor([0.2, 0.7, 0.9])  # 0.7 == S_thr: masked (Eq. 1 uses S > S_thr)
    out = q(z, quality)
    assert out.hq_mask.tolist() == [False, False, True]
    assert torch.equal(out.quantized[:2], out.common.quantized[:2])  # exactly Zq1
    assert torch.all(out.hq.quantized[:2] == 0) and torch.all(out.hq.loss[:2] == 0)
    assert torch.all(out.hq.codebook_loss[:2] == 0) and torch.all(out.hq.commitment_loss[:2] == 0)
    assert out.hq.loss[2] > 0
    fused = q.common.lookup(out.indices_common) + 0.8 * q.hq.lookup(out.indices_hq)
    torch.testing.assert_close(out.quantized[2], fused[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, out.common.loss + out.hq.loss)
    masked = q.lookup(out.indices_common, out.indices_hq, hq_mask=out.hq_mask)
    torch.testing.assert_close(masked, out.quantized, rtol=0, atol=1e-6)


def test_hq_codebook_gets_gradient_only_from_samples_above_threshold():
    q = _dual()
    z = torch.randn(2, 4, 2, 2)
    q(z, torch.tensor([0.1, 0.5])).loss.sum().backward()
    assert q.hq.codebook.grad is not None and torch.all(q.hq.codebook.grad == 0)  # in the graph, zero
    assert q.common.codebook.grad.abs().sum() > 0
    q.zero_grad()
    q(z, torch.tensor([0.1, 0.95])).loss.sum().backward()
    assert q.hq.codebook.grad.abs().sum() > 0


def test_dual_lookup_alpha_and_single_codebook_mode():
    q = _dual()
    idx = torch.randint(0, 16, (2, 3, 3))
    assert torch.equal(q.lookup(idx, idx, alpha=0.0), q.common.lookup(idx))
    torch.testing.assert_close(q.lookup(idx, idx, alpha=1.0), q.common.lookup(idx) + q.hq.lookup(idx))
    single = _dual(dual=False)
    z = torch.randn(2, 4, 3, 3)
    out = single(z, None)
    assert out.hq is None and out.indices_hq is None and not out.hq_mask.any()
    assert torch.equal(out.quantized, out.common.quantized)
    assert torch.equal(out.loss, out.common.loss)
    idx = out.indices_common
    assert torch.equal(single.lookup(idx, idx), single.common.lookup(idx))


def test_dual_quantizer_none_quality_uses_hq_for_every_sample():
    out = _dual()(torch.randn(2, 4, 2, 2), None)
    assert out.hq_mask.all()


# --------------------------------------------------------------------------------------
# Quality embedding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binned", "continuous"])
def test_quality_changes_the_transformer_logits(kind):
    model = build_restorer(tiny_cfg(quality_embedding=kind)).eval()
    lq = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        low = model(lq, 0.15, decode=False)
        high = model(lq, 0.85, decode=False)
        top = model(lq, 1.0, decode=False)
        bottom = model(lq, 0.0, decode=False)
    assert not torch.allclose(low.logits_common, high.logits_common)
    assert not torch.allclose(low.logits_hq, high.logits_hq)
    assert torch.isfinite(top.logits_common).all() and torch.isfinite(bottom.logits_common).all()


def test_binned_embedding_clamps_one_into_the_top_bin():
    emb = QualityEmbedding("binned", bins=10, channels=4, size=2)
    assert emb.bin_index(torch.tensor([0.0, 0.09, 0.1, 0.95, 1.0])).tolist() == [0, 0, 1, 9, 9]
    assert torch.equal(emb(torch.tensor([1.0]))[0], emb.maps[9])


def test_continuous_embedding_is_distinct_and_smooth():
    emb = QualityEmbedding("continuous", bins=10, channels=4, size=2, fourier_features=16)
    s = torch.linspace(0, 1, 101)
    maps = emb(s).flatten(1)
    steps = (maps[1:] - maps[:-1]).norm(dim=1)
    assert (steps > 0).all()  # every S gives its own condition
    assert steps.max() < 0.2 * maps.norm(dim=1).mean()  # a 0.01 change of S moves it a little


@pytest.mark.parametrize("kind", ["binned", "continuous", "none"])
@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_out_of_range_quality_raises(kind, bad):
    emb = QualityEmbedding(kind, bins=10, channels=4, size=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        emb(torch.tensor([0.5, bad]))


def test_quality_shape_is_checked():
    model = build_restorer(tiny_cfg())
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(2, 3, 32, 32), torch.tensor([0.5, 0.5, 0.5]), decode=False)


def test_no_quality_embedding_ignores_the_score():
    model = build_restorer(tiny_cfg(quality_embedding="none")).eval()
    lq = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        low, high = model(lq, 0.1, decode=False), model(lq, 0.9, decode=False)
    assert torch.equal(low.logits_common, high.logits_common)
    assert sum(p.numel() for p in model.quality_embedding.parameters()) == 0


# --------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------


def _grad_report(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in module.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    return missing, zero


def test_stage1_losses_reach_every_parameter():
    vq = build_vqgan(tiny_cfg())
    images = torch.rand(2, 3, 32, 32)
    out = vq(images, torch.tensor([0.3, 0.9]))  # one sample above S_thr: the HQ+ codebook learns
    assert out.reconstruction.shape == images.shape
    loss = F.l1_loss(out.reconstruction, images) + out.quant.loss.mean()
    loss.backward()
    missing, zero = _grad_report(vq)
    assert missing == [] and zero == []


def test_stage1_reaches_the_encoder_input_through_the_quantizer():
    vq = build_vqgan(tiny_cfg())
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    vq(images, torch.tensor([0.9])).reconstruction.mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_single_codebook_autoencoder_needs_no_quality():
    vq = build_vqgan(tiny_cfg(dual_codebook=False))
    out = vq(torch.rand(1, 3, 32, 32))
    assert out.quant.hq is None and vq.quantizer.hq is None
    with pytest.raises(ValueError, match="quality"):
        build_vqgan(tiny_cfg())(torch.rand(1, 3, 32, 32))


def test_code_targets_fuse_both_codebooks_for_every_image():
    vq = build_vqgan(tiny_cfg())
    images = torch.rand(2, 3, 32, 32)
    t = vq.code_targets(images)
    assert t.indices_common.shape == (2, 8, 8) and t.indices_hq.shape == (2, 8, 8)
    expected = vq.quantizer.lookup(t.indices_common, t.indices_hq)
    torch.testing.assert_close(t.z_q, expected, rtol=0, atol=1e-6)


def test_discriminator_is_per_sample_and_patchwise():
    d = build_discriminator(tiny_cfg())
    x = torch.rand(3, 3, 32, 32)
    logits = d(x)
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] > 1
    torch.testing.assert_close(d(x[:1]), logits[:1])  # GroupNorm: no batch coupling
    bn = PatchDiscriminator(channels=8, layers=2, norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())


# --------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------


def _stage2_model(**overrides) -> Restorer:
    cfg = tiny_cfg(**overrides)
    model = build_restorer(cfg)
    model.load_stage1(build_vqgan(cfg).state_dict())
    return model.freeze_for_stage2()


def test_restorer_output_shapes_and_alpha_override():
    model = _stage2_model().eval()
    lq = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(lq, torch.tensor([0.5, 1.0]))
        no_hq = model(lq, torch.tensor([0.5, 1.0]), alpha=0.0)
    assert out.z_lq.shape == (2, 64, 8, 8)
    assert out.logits_common.shape == out.logits_hq.shape == (2, 64, 256)
    assert out.indices_common.shape == (2, 8, 8)
    assert torch.equal(out.indices_common, out.logits_common.argmax(-1).view(2, 8, 8))
    assert out.restored.shape == lq.shape
    q = model.quantizer
    fused = q.common.lookup(out.indices_common) + 0.8 * q.hq.lookup(out.indices_hq)
    torch.testing.assert_close(out.z_f, fused)
    torch.testing.assert_close(no_hq.z_f, q.common.lookup(out.indices_common))
    code_only = model(lq, 1.0, decode=False)
    assert code_only.z_f is None and code_only.restored is None


def test_stage2_trains_encoder_embedding_and_transformer_only():
    model = _stage2_model()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("decoder.", "quantizer.")) for n in frozen)
    assert all(not p.requires_grad for p in model.decoder.parameters())
    assert all(not p.requires_grad for p in model.quantizer.parameters())

    lq, hq = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    target = build_vqgan(model.cfg).code_targets(hq)
    out = model(lq, torch.tensor([0.4, 0.9]))
    feat = F.mse_loss(out.z_lq, target.z_q)  # L_feat, Eq. 5
    index = (  # L_index, Eq. 6
        F.cross_entropy(out.logits_common.flatten(0, 1), target.indices_common.flatten())
        + F.cross_entropy(out.logits_hq.flatten(0, 1), target.indices_hq.flatten())
    )
    image = out.restored.mean()  # stands for L_quality
    (feat + 0.5 * index + 0.1 * image).backward()
    missing, zero = _grad_report(model)
    assert missing == [] and zero == []
    for name in ("decoder", "quantizer"):
        assert all(p.grad is None for p in getattr(model, name).parameters())
    assert model.transformer.head_hq.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("path", ["straight_through", "soft"])
def test_image_loss_reaches_the_transformer_only_on_the_soft_path(path):
    model = _stage2_model(gradient_path=path)
    out = model(torch.rand(2, 3, 32, 32), torch.tensor([0.5, 0.9]))
    out.restored.mean().backward()
    t_grads = [p.grad for p in model.transformer.parameters()]
    enc_grad = model.encoder.conv_in.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0  # both paths reach E
    emb_grad = model.quality_embedding.maps.grad
    assert emb_grad is not None and emb_grad.abs().sum() > 0
    if path == "straight_through":
        assert all(g is None for g in t_grads)
    else:
        assert all(g is not None for g in t_grads)
        assert model.transformer.head_common.weight.grad.abs().sum() > 0
        assert model.transformer.head_hq.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_soft_path_gradient_is_that_of_the_softmax_weighted_codebooks(alpha):
    """Soft path: d z_f / d logits is that of softmax(logits / tau) @ C for each codebook, the HQ+
    codebook's term weighted by alpha (the model's 0.8, or the one passed), at a tau other than 1."""
    tau = 0.5
    model = _stage2_model(gradient_path="soft", soft_temperature=tau)
    out = model(torch.rand(2, 3, 32, 32), torch.tensor([0.5, 0.9]), alpha=alpha)
    out.logits_common.retain_grad()
    out.logits_hq.retain_grad()
    w = torch.randn(out.z_f.shape, generator=torch.Generator().manual_seed(3))
    (out.z_f * w).sum().backward()

    b, c, h, wd = out.z_f.shape
    a = model.quantizer.alpha if alpha is None else alpha
    for logits, codebook, scale in ((out.logits_common, model.quantizer.common.codebook, 1.0),
                                    (out.logits_hq, model.quantizer.hq.codebook, a)):
        x = logits.detach().requires_grad_(True)
        soft = torch.softmax(x / tau, dim=-1) @ codebook.detach()  # (B, h*w, C)
        (scale * soft.transpose(1, 2).reshape(b, c, h, wd) * w).sum().backward()
        assert x.grad.abs().max() > 0
        torch.testing.assert_close(logits.grad, x.grad, rtol=1e-4, atol=1e-6 * float(x.grad.abs().max()))


def test_both_gradient_paths_restore_the_same_image():
    st = _stage2_model().eval()
    soft = build_restorer(tiny_cfg(gradient_path="soft")).eval()
    soft.load_state_dict(st.state_dict())
    lq = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(st(lq, 1.0).restored, soft(lq, 1.0).restored)


def test_load_stage1_copies_weights_and_rejects_a_mismatch():
    cfg = tiny_cfg()
    vq = build_vqgan(cfg)
    model = build_restorer(cfg)
    model.load_stage1(vq.state_dict())
    assert torch.equal(model.quantizer.hq.codebook, vq.quantizer.hq.codebook)
    assert torch.equal(model.decoder.conv_out.weight, vq.decoder.conv_out.weight)
    single = build_vqgan(tiny_cfg(dual_codebook=False))
    with pytest.raises(RuntimeError, match="hq"):
        model.load_stage1(single.state_dict())


def test_single_codebook_restorer():
    model = _stage2_model(dual_codebook=False)
    out = model(torch.rand(1, 3, 32, 32), 1.0)
    assert out.logits_hq is None and out.indices_hq is None and model.transformer.head_hq is None
    torch.testing.assert_close(out.z_f, model.quantizer.common.lookup(out.indices_common))


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


def test_paper_parameter_counts():
    counts = parameter_counts(C.from_preset("paper").model)
    # The official IQPIR network, tensor for tensor: the sum over assets/official/manifest-iqpir.json
    # is 95,554,499 (CodeFormer's 94.11M with CFT 10.66M, plus a second codebook 0.26M, the
    # 10-bin 16x16x256 score embedding 0.66M and a second 1024-way head 0.52M).
    assert counts["encoder"] == pytest.approx(29.42e6, rel=1e-3)
    assert counts["decoder"] == pytest.approx(34.06e6, rel=1e-3)
    assert counts["transformer"] + counts["heads"] == pytest.approx(19.71e6 + 0.52e6, rel=1e-3)
    assert counts["codebook_common"] == counts["codebook_hq"] == 1024 * 256
    assert counts["quality_embedding"] == 10 * 16 * 16 * 256
    assert counts["cft"] == pytest.approx(10.66e6, rel=1e-3)
    assert counts["total_params"] == 95_554_499
    parts = (
        "encoder", "quality_embedding", "transformer", "heads", "codebook_common", "codebook_hq", "decoder", "cft"
    )
    assert counts["total_params"] == sum(counts[k] for k in parts)
    assert counts["discriminator"] == pytest.approx(6.96e6, rel=1e-3)


def test_meta_counts_match_a_real_build():
    cfg = C.from_preset("tiny").model
    counts = parameter_counts(cfg)
    assert counts["total_params"] == sum(p.numel() for p in build_restorer(cfg).parameters())
    assert counts["vqgan_params"] == sum(p.numel() for p in build_vqgan(cfg).parameters())
    single = parameter_counts(dataclasses.replace(cfg, dual_codebook=False))
    assert single["codebook_hq"] == 0 and single["heads"] == counts["heads"] // 2


def test_model_info_cli_prints_json():
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli_main(["model-info", "--preset", "tiny", "--set", "model.quality_embedding=continuous"])
    assert code == 0
    counts = json.loads(buf.getvalue())
    assert counts["total_params"] > 0 and counts["quality_embedding"] > 0


def test_codebook_init_from_data_puts_every_code_near_an_encoder_output():
    from iqpir.models.quantizer import DualCodebookQuantizer

    q = DualCodebookQuantizer(num_codes=32, dim=8)
    z = torch.randn(2, 8, 4, 4) * 3 + 5
    q.init_from(z, generator=torch.Generator().manual_seed(0))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    for vq in (q.common, q.hq):
        nearest = torch.cdist(vq.codebook.detach(), flat).min(dim=1).values
        assert nearest.max() < 0.2 * z.std()
    assert not torch.allclose(q.common.codebook, q.hq.codebook)  # two draws, not one codebook twice
