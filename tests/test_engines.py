"""The inference engines: float32 stays exact, "auto" picks bf16 only where it is native, the
fast path's fused blocks compute what the modules compute and never touch the user's model."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from train_helpers import SMALL_MODEL

from iqpir import devices
from iqpir.config import from_preset
from iqpir.inference import Restorer, engines
from iqpir.inference.files import DescribedModel
from iqpir.models import build_restorer
from iqpir.models.vqgan import ResBlock, Upsample


def tiny_model(cft: bool = True, seed: int = 0) -> nn.Module:
    """A random tiny restorer with every inference feature on: dual codebook, binned quality
    embedding, AdaIN, CFT blocks at 32 and 64 px."""
    cfg = from_preset("tiny")
    cfg.model.adain = True
    cfg.model.cft_resolutions = [32, 64] if cft else []
    torch.manual_seed(seed)
    return build_restorer(cfg.model).eval()


def test_float32_is_the_network_bit_for_bit():
    model = tiny_model()
    x = torch.rand(2, 3, 64, 64)
    restorer = Restorer(model, 64, device="cpu", dtype="float32")
    # Handed over (load_restorer), the network runs with in-place residual blocks: still exact.
    owned = Restorer(copy.deepcopy(model), 64, device="cpu", dtype="float32", own_model=True)
    assert any(type(m) is engines.InPlaceResBlock for m in owned.model.modules())
    assert not any(type(m) is engines.InPlaceResBlock for m in model.modules())
    for q, w in ((0.9, 0.0), (0.3, 0.5)):
        with torch.inference_mode():
            expected = model(x, torch.full((2,), q), fidelity=w).restored.clamp(0, 1)
        assert torch.equal(restorer.restore(x, quality=q, fidelity=w), expected)
        assert torch.equal(owned.restore(x, quality=q, fidelity=w), expected)


def test_auto_means_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    model = tiny_model(cft=False)
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert engines.resolve_dtype("auto", cpu, model) == "bfloat16"
    assert isinstance(engines.make_engine(model, cpu, "auto"), engines.MixedEngine)
    assert engines.resolve_dtype("auto", cpu, nn.Identity()) == "float32"  # not a restorer
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert engines.resolve_dtype("auto", cpu, model) == "bfloat16"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert engines.resolve_dtype("auto", cpu, model) == "float32"
    assert engines.resolve_dtype("float32", cpu, model) == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        engines.resolve_dtype("int4", cpu, model)
    with pytest.raises(ValueError, match="int8 runs a calibrated OpenVINO graph, not a torch network"):
        engines.resolve_dtype("int8", cpu, model)


# CPUs as /proc/cpuinfo names them: (flags, the engine `auto` gives, its dtype, the reason it prints).
CPUS = {
    "avx512-bf16": ({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16"}, engines.MixedEngine,
                    "bfloat16", "this CPU computes in bf16 natively (avx512_bf16)"),
    "avx2-only": ({"sse4_2", "avx", "avx2", "fma", "f16c"}, engines.MixedEngine, "float32",
                  "this CPU has no native bf16 (avx2 fma f16c)"),
    "sse-only": ({"sse2", "ssse3", "sse4_1", "sse4_2"}, engines.TorchEngine, "float32",
                 "this CPU has no native bf16 (sse4_2); without AVX2 and FMA the faster path is slower here, so the network runs as trained"),
}


@pytest.mark.parametrize("cpu_name", sorted(CPUS))
def test_auto_takes_the_fastest_path_each_cpu_has(cpu_name, monkeypatch):
    """auto: bf16 convolutions with native bf16, float32 ones restructured with AVX2 + FMA (measured
    faster there: docs/performance.md), the exact network on older CPUs; it says why. A named
    dtype is never second-guessed: float32 stays the exact network on every CPU."""
    flags, kind, dtype, reason = CPUS[cpu_name]
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    model = tiny_model(cft=False)
    engine = engines.make_engine(model, cpu, "auto")
    assert (type(engine), engine.dtype, engine.auto_reason) == (kind, dtype, reason)
    exact = engines.make_engine(model, cpu, "float32")
    assert type(exact) is engines.TorchEngine and exact.auto_reason is None
    assert exact.describe() == "torch float32"
    unet = DescribedModel(model=nn.Conv2d(3, 3, 3, padding=1), kind="unet", size_multiple=1, call="image")
    plain = engines.make_engine(unet, cpu, "auto")
    assert type(plain) is engines.TorchEngine and plain.dtype == "float32"
    assert plain.auto_reason.endswith("; the faster path is built for IQPIR and CodeFormer networks, so this unet model "
                                      "runs as trained")


def test_the_float32_fast_path_is_the_network_up_to_rounding():
    """MixedEngine in float32 (auto on AVX2-only CPUs): the same codes as the exact network and
    the same image up to float32 rounding (measured: 3.5e-6 at most here); it says what it is,
    and the caller's model is left as it was."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = engines.TorchEngine(model, torch.device("cpu"), "float32")
    fast = engines.MixedEngine(model, torch.device("cpu"), "float32")
    owned = engines.MixedEngine(copy.deepcopy(model), torch.device("cpu"), "float32", own=True)
    assert fast.describe() == "torch float32 convolutions (channels-last, sub-pixel upsampling)"
    assert fast.dtype == "float32" and all(p.dtype == torch.float32 for p in fast.fast.parameters())
    assert any(isinstance(m, engines.InferenceUpsample) for m in fast.fast.modules())
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for q, w in ((1.0, 0.0), (0.4, 0.7)):
        a = exact.outputs(x, q, None, w)
        for b in (fast.outputs(x, q, None, w), owned.outputs(x, q, None, w)):
            assert torch.equal(a["indices_common"], b["indices_common"])
            assert torch.equal(a["indices_hq"], b["indices_hq"])
            torch.testing.assert_close(b["restored"], a["restored"], atol=1e-4, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_restore_line_says_why_auto_chose_its_path(monkeypatch):
    """`iqpir restore` prints the engine once; with --dtype auto, also the CPU fact behind it."""
    from iqpir.inference.photos import settings_line

    for name in ("avx2-only", "avx512-bf16"):
        flags, _, _, reason = CPUS[name]
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: frozenset(flags))
        r = Restorer(tiny_model(cft=False), 64, device="cpu", dtype="auto")
        line = settings_line(r, r.settings(0.8), None)
        assert f"{r.engine.describe()} (auto: {reason})" in line, line
    r = Restorer(tiny_model(cft=False), 64, device="cpu", dtype="float32")
    line = settings_line(r, r.settings(0.8), None)
    assert "torch float32, quality" in line and "auto" not in line, line


def test_inference_blocks_compute_what_the_modules_compute():
    """In float32 the restructured blocks equal the modules they replace (up to rounding)."""
    torch.manual_seed(0)
    for cin, cout in ((32, 32), (32, 64)):  # identity skip and 1x1-conv skip
        block = ResBlock(cin, cout).eval()
        for p in block.parameters():
            p.data.normal_(0, 0.3)
        x = torch.randn(2, cin, 10, 10)
        with torch.inference_mode():
            fast = engines.low_precision_copy(block, torch.float32, torch.device("cpu"))
            assert type(fast) is engines.InferenceResBlock
            torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), block(x),
                                       atol=1e-4, rtol=1e-4)
    for h, w in ((5, 7), (1, 1), (16, 16)):
        up = Upsample(8).eval()
        x = torch.randn(2, 8, h, w)
        with torch.inference_mode():
            fast = engines.InferenceUpsample(up.conv)
            y = fast(x.contiguous(memory_format=torch.channels_last))
            assert y.shape == (2, 8, 2 * h, 2 * w) and y.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(y, up(x), atol=1e-5, rtol=1e-5)


def test_fast_path_is_close_to_float32_and_leaves_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tree = [(name, type(m), [id(t) for t in m._parameters.values()]) for name, m in model.named_modules()]
    exact = engines.TorchEngine(model, torch.device("cpu"), "float32")
    fast = engines.MixedEngine(model, torch.device("cpu"), "bfloat16")
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for q, w in ((1.0, 0.0), (0.4, 0.7)):
        a, b = exact.outputs(x, q, None, w), fast.outputs(x, q, None, w)
        for key in ("indices_common", "indices_hq"):
            assert (a[key] == b[key]).float().mean() >= 0.9, key
        # Given the same codes, the bf16 decoder's image differs from float32's by rounding only.
        with torch.inference_mode():
            ref = model(x, q, fidelity=w)
            features = {} if w else None
            fast.fast.encoder(x, features)
            def fuse(r, h, features=features, w=w):
                return fast.fast.cft(r, features[r], h, w)

            got = fast.fast.decoder(ref.z_f, fuse if w else None)
        diff = (got - ref.restored).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert all(p.is_contiguous() for p in model.parameters())  # not moved to channels-last
    assert fast.model is model and fast.fast.encoder is not model.encoder
    # Not handed over: the same modules, classes and parameter objects as before.
    assert [(name, type(m), [id(t) for t in m._parameters.values()]) for name, m in model.named_modules()] == tree


def test_restorer_takes_a_dtype_and_reports_it():
    model = tiny_model(cft=False)
    r = Restorer(model, 64, device="cpu", dtype="bfloat16")
    assert r.dtype == "bfloat16" and r.model is model and isinstance(r.engine, engines.MixedEngine)
    out = r.restore(torch.rand(3, 64, 64), quality=0.8)
    assert out.dtype == torch.float32 and out.shape == (3, 64, 64) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="dtype must be one of"):
        Restorer(model, 64, device="cpu", dtype="half")
    with pytest.raises(ValueError, match="iqpir export"):
        Restorer(model, 64, device="cpu", engine="onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("kind, runs", [("iqpir", [(0.9, 0.0)]), ("codeformer", [(None, 0.0), (None, 0.5)])])
def test_fast_path_keeps_the_codes_of_the_official_networks(kind, runs, tmp_path):
    """Paper-size networks with the official fixtures' weights: >= 97% of the code tokens equal
    to float32's (measured: 98.0% for IQPIR S=0.9 and CodeFormer w=0 and 0.5)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from test_official import rule_state_dict

    import iqpir

    torch.save({"params_ema": rule_state_dict(kind)}, tmp_path / "w.pth")
    exact = iqpir.load(tmp_path / "w.pth", device="cpu", dtype="float32").engine
    fast = engines.MixedEngine(exact.model, torch.device("cpu"), "bfloat16")
    face = Image.open(Path(__file__).parent / "assets" / "official" / "input.png").convert("RGB")
    x = torch.from_numpy(np.array(face)).permute(2, 0, 1).float()[None] / 255
    for quality, w in runs:
        a, b = exact.outputs(x, quality, None, w), fast.outputs(x, quality, None, w)
        same = a["indices_common"] == b["indices_common"]
        if "indices_hq" in a:
            same &= a["indices_hq"] == b["indices_hq"]
        assert same.float().mean() >= 0.97, (kind, quality, w, same.float().mean())


@pytest.mark.slow
# w > 0: the CFT blocks run too.
@pytest.mark.parametrize("kind, runs", [("iqpir", [(0.9, 0.0)]), ("codeformer", [(None, 0.5)])])
def test_the_float32_fast_path_keeps_the_official_networks_codes(kind, runs, tmp_path):
    """Paper-size networks, the official fixtures' weights: every code is float32's except where
    float32's own two best logits are tied within rounding (measured: one token of the CodeFormer
    fixture, its logits 2.4e-6 apart, none for IQPIR), and from float32's latent the fast
    decoder's image is float32's within 2e-3."""
    import numpy as np
    from PIL import Image
    from test_official import rule_state_dict

    import iqpir

    torch.save({"params_ema": rule_state_dict(kind)}, tmp_path / "w.pth")
    exact = iqpir.load(tmp_path / "w.pth", device="cpu", dtype="float32").engine
    fast = engines.MixedEngine(exact.model, torch.device("cpu"), "float32")
    face = Image.open(Path(__file__).parent / "assets" / "official" / "input.png").convert("RGB")
    x = torch.from_numpy(np.array(face)).permute(2, 0, 1).float()[None] / 255
    seen = {}
    hook = exact.model.transformer.register_forward_hook(lambda m, a, out: seen.update(logits=out))
    try:
        for quality, w in runs:
            a = exact.outputs(x, quality, None, w)
            logits = seen["logits"]
            b = fast.outputs(x, quality, None, w)
            for key, scores in zip(("indices_common", "indices_hq"), logits):
                if key not in a:
                    continue
                scores = scores.reshape(-1, scores.shape[-1])
                gap = scores.max(-1).values - scores.gather(1, b[key].reshape(-1, 1))[:, 0]
                moved = (a[key] != b[key]).flatten()
                assert moved.sum() <= 2 and (gap[moved] < 1e-5).all(), (kind, quality, w, key, gap[moved])
            with torch.inference_mode():
                ref = exact.model(x, None if quality is None else torch.tensor([quality]), fidelity=w)
                features = {} if w else None
                fast.fast.encoder(x, features)
                def fuse(r, h, features=features, w=w):
                    return fast.fast.cft(r, features[r], h, w)

                got = fast.fast.decoder(ref.z_f, fuse if w else None)
            worst = (got - ref.restored).abs().max()
            assert worst < 2e-3, (kind, quality, w, worst)
    finally:
        hook.remove()


def _conv_parts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: getattr(model, name) for name in ("encoder", "decoder", "cft")}


def _is_norm(name: str) -> bool:
    return ".norm" in f".{name}"  # GroupNorm parameters stay float32 on the CPU


def test_an_owned_model_is_converted_in_place_without_float32_copies():
    """load_restorer hands its network over: the fast path converts the convolutional parts in
    place (no float32 weights kept beside the bf16 ones) and computes what the copying path does."""
    model = tiny_model()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    copying = engines.MixedEngine(copy.deepcopy(model), torch.device("cpu"), "bfloat16")
    owned_model = copy.deepcopy(model)
    transformer_weight = owned_model.transformer.proj_in.weight
    # The float32 convolution weights, watched without keeping them alive.
    replaced = {f"{part}.{n}": weakref.ref(p) for part, m in _conv_parts(owned_model).items()
                for n, p in m.named_parameters() if not _is_norm(n)}
    f32_bytes = {k: v.nbytes for k, v in owned_model.state_dict().items()}
    owned = engines.MixedEngine(owned_model, torch.device("cpu"), "bfloat16", own=True)
    assert owned.model is owned_model and owned.fast is owned_model
    for name, part in _conv_parts(owned_model).items():
        for pname, p in part.named_parameters():
            assert p.dtype == (torch.float32 if _is_norm(pname) else torch.bfloat16), (name, pname, p.dtype)
    assert owned_model.transformer.proj_in.weight is transformer_weight  # codes: float32, untouched
    gc.collect()
    assert replaced and [k for k, ref in replaced.items() if ref() is not None] == []  # released, not kept
    # The float32 tensors the network holds: the original ones less every converted weight.
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (*owned_model.parameters(), *owned_model.buffers()) if t.dtype == torch.float32}
    assert sum(held.values()) == sum(n for k, n in f32_bytes.items() if k not in replaced)
    for q, w in ((0.9, 0.0), (0.4, 0.6)):
        a, b = copying.outputs(x, q, None, w), owned.outputs(x, q, None, w)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_restorer_hands_its_model_over_to_the_fast_path(tmp_path):
    """load_restorer owns the network it builds, so the fast path converts it in place; the
    image is the one a copying conversion of the same weights gives."""
    import iqpir
    from iqpir import checkpoint as ckpt
    from iqpir import config as C

    cfg = C.load(preset="tiny", overrides=[
        *SMALL_MODEL, "train.stage=2",
        "model.cft_resolutions=[16,32]"])
    torch.manual_seed(0)
    model = build_restorer(cfg.model).eval()
    ckpt.save_checkpoint(ckpt.checkpoint_stem(tmp_path, 1), {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    restorer = iqpir.load(tmp_path, device="cpu", dtype="bfloat16")
    assert isinstance(restorer.engine, engines.MixedEngine) and restorer.engine.fast is restorer.model
    f32 = {n for n, p in restorer.model.named_parameters() if p.dtype == torch.float32}
    assert f32 and not any(n.startswith(("encoder.", "decoder.", "cft.")) and not _is_norm(n) for n in f32)
    copying = engines.MixedEngine(model, torch.device("cpu"), "bfloat16")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(restorer.restore(x, quality=0.6, fidelity=0.5), copying(x, 0.6, None, 0.5))
    # float32: the network itself, with in-place residual blocks.
    exact = iqpir.load(tmp_path, device="cpu", dtype="float32")
    assert any(type(m) is engines.InPlaceResBlock for m in exact.model.modules())


@pytest.mark.parametrize("cin, cout", [(32, 32), (32, 64)])  # identity skip, 1x1-conv skip
def test_in_place_residual_blocks_are_bit_identical_and_leave_their_input(cin, cout):
    """InPlaceResBlock (float32 owned models) and InferenceResBlock (the fast path) reorder
    nothing: the same kernels in the same order, so the same bits; the input is not written."""
    torch.manual_seed(cin + cout)
    block = ResBlock(cin, cout).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    in_place = copy.deepcopy(block)
    in_place.__class__ = engines.InPlaceResBlock
    for fast, dtype in ((in_place, torch.float32), (engines.low_precision_copy(block, torch.bfloat16,
                                                                               torch.device("cpu")), torch.bfloat16)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, cin, 12, 12).to(dtype).contiguous(memory_format=layout)
            before = x.clone()
            with torch.inference_mode():
                expected = ResBlock.forward(fast, x)  # the out-of-place formulation, same weights
                got = fast(x)
            assert torch.equal(got, expected), (dtype, layout)
            assert torch.equal(x, before), (dtype, layout)


@pytest.mark.parametrize("own", [False, True])
def test_the_fast_path_predicts_the_codes_in_float32(own):
    """No autocast around the fast path: the quality embedding, the Transformer and the code
    lookup run in float32, so its logits are float32's for the (bf16-encoded) latent exactly."""
    model = tiny_model()
    engine = engines.MixedEngine(copy.deepcopy(model) if own else model, torch.device("cpu"), "bfloat16", own=own)
    net = engine.fast
    seen = {}
    hooks = [net.transformer.register_forward_hook(lambda m, a, out: seen.update(z=a[0], logits=out)),
             net.quality_embedding.register_forward_hook(lambda m, a, out: seen.update(maps=out)),
             net.decoder.register_forward_pre_hook(lambda m, a: seen.update(z_f=a[0]))]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    try:
        out = engine.outputs(x, 0.4, None, 0.5)
    finally:
        for h in hooks:
            h.remove()
    assert all(p.dtype == torch.float32 for part in (net.transformer, net.quality_embedding, net.quantizer)
               for p in (*part.parameters(), *part.buffers()) if p.is_floating_point())
    assert seen["z"].dtype == seen["maps"].dtype == seen["z_f"].dtype == torch.float32
    with torch.inference_mode():
        expected = model.transformer(seen["z"])  # the float32 Transformer, outside any autocast
    for got, want in zip(seen["logits"], expected):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    n, _, h, w = seen["z"].shape
    assert torch.equal(out["indices_common"], expected[0].argmax(-1).view(n, h, w))
    assert torch.equal(out["indices_hq"], expected[1].argmax(-1).view(n, h, w))


def test_official_weights_become_the_parameters_without_a_copy():
    """build_official assigns the file's tensors (one copy of the weights in memory, not two):
    only views sharing a storage (IQPIR's head rows) and other dtypes are copied."""
    import json

    from iqpir import official

    assets = Path(__file__).parent / "assets" / "official"
    entries = json.loads((assets / "manifest-iqpir.json").read_text())["entries"]
    state = {e["key"]: torch.empty(e["shape"]) for e in entries}  # paper size, never written
    state["feat_emb.bias"] = torch.zeros(state["feat_emb.bias"].shape, dtype=torch.float16)
    rows = state["position_emb"].shape[0]  # a contiguous view into a larger storage, as files may hold
    state["position_emb"] = torch.empty(2 * rows, *state["position_emb"].shape[1:])[:rows]
    weights = official.OfficialWeights("iqpir", state, "params_ema", Path("iqpir.pth"))
    model, _ = official.build_official(weights)
    params = dict(model.named_parameters())
    conv = params["encoder.conv_in.weight"]
    assert conv.data_ptr() == state["encoder.blocks.0.weight"].data_ptr()
    assert params["transformer.proj_in.bias"].dtype == torch.float32
    head_common, head_hq = params["transformer.head_common.weight"], params["transformer.head_hq.weight"]
    assert head_common.is_contiguous() and head_hq.is_contiguous()
    assert head_common.untyped_storage().nbytes() == head_common.nbytes  # not the whole (2K, C) matrix
    pos = params["transformer.pos_emb"]
    assert pos.untyped_storage().nbytes() == pos.nbytes
    assert not any(t.is_meta for t in model.state_dict().values())


def test_weights_are_read_outside_the_kept_heap():
    """After keep_freed_memory() large blocks come from the heap (kept when freed); weights read
    inside weights_outside_the_heap() are mmapped, so freeing them leaves no hole in the heap.
    (A block the heap's free memory can hold still comes from there: the weights are read first,
    into a small heap, which is where this matters.)"""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc only")
    if not devices.keep_freed_memory():
        pytest.skip("IQPIR_DEFAULT_MALLOC is set or malloc is not glibc's")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Info

    def mapped_after_alloc() -> tuple[int, int]:
        # Larger than all the free heap memory (earlier tests leave some, kept): a block malloc
        # cannot carve from free chunks, so it grows the heap (brk) or maps it on its own.
        before = libc.mallinfo2()
        size = before.fordblks + (64 << 20)
        t = torch.empty(size, dtype=torch.uint8)  # untouched pages: virtual memory only
        grown = libc.mallinfo2().hblkhd - before.hblkhd
        del t
        return grown, size

    grown, _ = mapped_after_alloc()
    assert grown == 0  # from the heap
    with devices.weights_outside_the_heap():
        grown, size = mapped_after_alloc()
        assert grown >= size  # its own mapping
    grown, _ = mapped_after_alloc()
    assert grown == 0  # the setting is back


def _conv_output_dtypes(restorer: Restorer, run) -> set[torch.dtype]:
    """The dtypes the convolutions of the network the engine runs produce while `run()` runs."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda m, a, o: seen.add(o.dtype))
             for m in restorer.engine._network().modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("network", ["iqpir", "unet"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "auto"])
def test_the_convolutions_compute_in_the_dtype_the_restorer_reports(network, dtype, monkeypatch):
    """A probe on every Conv2d: what the engine says (restorer.dtype, which /api/health shows) is what
    the convolutions compute in, for the IQPIR network (the mixed bf16 path) and a plug-in U-Net
    (autocast). `auto` on a CPU without native bf16 is float32."""
    from iqpir.inference.files import DescribedModel
    from iqpir.plugin import conditioned_unet

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    if network == "iqpir":
        described, x = engines.as_described(tiny_model(cft=False), 64), torch.rand(3, 64, 64)
    else:
        described = DescribedModel(model=conditioned_unet(channels=8, levels=3).eval(), kind="unet",
                                   size_multiple=8, quality=True, call="image")
        x = torch.rand(3, 24, 40)
    r = Restorer(described, device="cpu", dtype=dtype)
    expected = {"float32": "float32", "bfloat16": "bfloat16", "auto": "float32"}[dtype]
    assert r.dtype == expected
    seen = _conv_output_dtypes(r, lambda: r.restore(x, quality=0.7))
    assert seen == {engines.DTYPES[expected]}, f"{network} reports {r.dtype}, its convolutions gave {seen}"
