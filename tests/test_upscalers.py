"""Standard upscalers and other image models through spandrel (issue 23, items 1, 3, 4).

Random weights in the releases' key layouts, made here (no downloads): Real-ESRGAN's RRDBNet x2
(pixel-unshuffle input) and x4 in BasicSR keys, and a small SwinIR. spandrel recognises each; our
pipeline's output equals a direct spandrel call; tiles leave no seam; the knobs these models lack
are refused in one line; a pickle that would run code is refused before anything runs.
"""

from __future__ import annotations

import importlib.util
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_default_model import tiny_file

import iqpir
from iqpir import io
from iqpir.cli import main
from iqpir.inference import files

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                 reason="needs the upscale extra: pip install 'iqpir[upscale]'")]


def real_esrgan_state(scale: int, nf: int = 16, blocks: int = 1, gc: int = 32, seed: int = 0) -> dict:
    """RRDBNet in Real-ESRGAN's (BasicSR's) keys: conv_first, body.N.rdbK.convJ, conv_body, conv_up1/2,
    conv_hr, conv_last; x2 models take a pixel-unshuffled input (12 channels), x4 plain RGB."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, c_out, c_in):
        state[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.05
        state[f"{name}.bias"] = torch.randn(c_out, generator=g) * 0.01

    conv("conv_first", nf, 3 * {1: 16, 2: 4, 4: 1}[scale])
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{c}", nf if c == 5 else gc, nf + (c - 1) * gc)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, nf, nf)
    conv("conv_last", 3, nf)
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import save_file
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    root = tmp_path_factory.mktemp("upscalers")
    torch.save({"params_ema": real_esrgan_state(2)}, root / "RealESRGAN_x2plus.pth")
    save_file(real_esrgan_state(4, seed=1), root / "RealESRGAN_x4plus.safetensors")
    torch.manual_seed(2)
    swin = SwinIR(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, upscale=2,
                  upsampler="pixelshuffledirect", mlp_ratio=2.0)
    torch.save({"params": swin.state_dict()}, root / "SwinIR_small_x2.pth")
    return {"x2": root / "RealESRGAN_x2plus.pth", "x4": root / "RealESRGAN_x4plus.safetensors",
            "swinir": root / "SwinIR_small_x2.pth"}


@pytest.fixture(scope="module")
def sky_portrait(tmp_path_factory):
    """A face (grace_hopper, 120x140) on the right of a flat blue 240x160 photo: the left half is
    background only."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = Image.open(fh).convert("RGB").resize((120, 140), Image.LANCZOS)
    photo = Image.new("RGB", (240, 160), (90, 140, 200))
    photo.paste(face, (100, 10))
    src = tmp_path_factory.mktemp("sky") / "photo.png"
    photo.save(src)
    return src


def direct(path, x: torch.Tensor) -> torch.Tensor:
    """spandrel itself on (3, H, W) (its own file loading)."""
    import spandrel

    desc = spandrel.ModelLoader().load_from_file(str(path)).eval()
    with torch.inference_mode():
        return desc(x[None])[0].clamp(0, 1)


@pytest.mark.parametrize("name, arch, scale", [("x2", "ESRGAN", 2), ("x4", "ESRGAN", 4), ("swinir", "SwinIR", 2)])
def test_spandrel_detects_each_file_and_our_output_is_its_output(models, name, arch, scale):
    d = files.describe(models[name])
    assert (d.kind, d.scale, d.call, d.quality, d.alpha, d.fidelity) == (arch, scale, "image", False, None, False)
    assert "spandrel" in d.source["licence"]
    x = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(3))
    ours = iqpir.load(models[name], device="cpu", dtype="float32").restore(x)
    assert ours.shape == (3, 32 * scale, 40 * scale)
    assert float((ours - direct(models[name], x)).abs().max()) <= 1e-4


def test_tiles_leave_no_seam(models):
    x = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(4))
    whole = iqpir.load(models["x4"], device="cpu", dtype="float32").restore(x)
    tiled = iqpir.load(models["x4"], device="cpu", dtype="float32", tile=24).restore(x)
    assert tiled.shape == whole.shape
    # Inside, tiles and the whole image agree to 5e-4 (0.13/255); at the image's own border the
    # tiled run sees mirrored pixels where the whole run sees the network's zero padding (0.015).
    off = (tiled - whole).abs()[:, 16:-16, 16:-16]
    assert float(off.max()) < 2e-3, float(off.max())


def test_bg_upsampler_without_faces_is_an_upscaling_restore(models, tmp_path):
    src = tmp_path / "in" / "p.png"
    io.write_image(src, torch.rand(3, 30, 44, generator=torch.Generator().manual_seed(5)))
    for model, upscale in (("x2", 2), ("x4", 2)):  # native, and an x4 resampled to x2
        out = tmp_path / f"out-{model}"
        assert main(["restore", str(src), "--bg-upsampler", str(models[model]), "--upscale", str(upscale),
                     "--out", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
        got = np.asarray(Image.open(out / "p.png")).astype(int)
        assert got.shape == (60, 88, 3)
        want = direct(models[model], io.load_rgb(src))
        if model == "x4":
            want = torch.nn.functional.interpolate(want[None], size=(60, 88), mode="bicubic", antialias=True,
                                                   align_corners=False).clamp(0, 1)[0]
        assert np.abs(got - io.to_uint8(want).astype(int)).max() <= 1


def test_bg_upsampler_with_faces_restores_the_background(models, sky_portrait, tmp_path):
    src = sky_portrait
    unet, _ = tiny_file(tmp_path)
    out = tmp_path / "out"
    assert main(["restore", str(src), "--faces", "--detector", "hog", "--checkpoint", str(unet), "--bg-upsampler",
                 str(models["x4"]), "--upscale", "2", "--out", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    got = np.asarray(Image.open(out / "photo.png")).astype(int)
    x4 = direct(models["x4"], io.load_rgb(src))  # the x4 model's output, resampled to the asked x2
    want = torch.nn.functional.interpolate(x4[None], size=(320, 480), mode="bicubic", antialias=True,
                                           align_corners=False).clamp(0, 1)[0]
    want = io.to_uint8(want).astype(int)
    assert got.shape == want.shape == (320, 480, 3)
    # far from the face, the output is the upscaler's
    assert np.abs(got[:, :120] - want[:, :120]).max() <= 1


@pytest.mark.parametrize("knob, value", [("quality", "0.5"), ("alpha", "0.5"), ("fidelity", "0.5")])
def test_knobs_these_models_lack_are_refused(models, knob, value, tmp_path, capsys):
    src = tmp_path / "in" / "p.png"
    io.write_image(src, torch.rand(3, 16, 16))
    rc = main(["restore", str(src), "--checkpoint", str(models["x2"]), f"--{knob}", value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"leave --{knob} out" in err, err
    assert not (tmp_path / "o" / "p.png").exists()


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch BOOM_WAS_RUN",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil_x4.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}, "payload": _Boom()}, bad)
    src = tmp_path / "p.png"
    io.write_image(src, torch.rand(3, 16, 16))
    rc = main(["restore", str(src), "--bg-upsampler", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "refused" in err and "code to unpickle" in err, err
    assert not (tmp_path / "BOOM_WAS_RUN").exists()


def test_bf16_falls_back_to_float32_where_an_architecture_breaks(models):
    from iqpir.inference.engines import make_engine

    d = files.describe(models["x2"])
    assert d.low_precision is True  # ESRGAN runs under bf16 autocast
    d.low_precision = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = make_engine(d, torch.device("cpu"), "bfloat16")
    assert engine.dtype == "float32" and any("runs float32" in str(w.message) for w in caught)


def test_without_the_extra_the_error_names_it(models, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spandrel" else object())
    with pytest.raises(ValueError, match=r"pip install 'iqpir\[upscale\]'"):
        files.describe(models["x2"])


def test_face_upsample_pastes_faces_from_the_upscaled_crop(models, sky_portrait, tmp_path, capsys):
    """--face-upsample: the restored face goes through the upscaler before paste-back, so the face
    region differs from a run without it, and the far field (the upscaler's background) does not."""
    src = sky_portrait
    unet, _ = tiny_file(tmp_path)
    common = ["restore", str(src), "--faces", "--detector", "hog", "--checkpoint", str(unet), "--bg-upsampler",
              str(models["x2"]), "--upscale", "2", "--device", "cpu", "--dtype", "float32"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--face-upsample", "--out", str(tmp_path / "up")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "photo.png")).astype(int)
    up = np.asarray(Image.open(tmp_path / "up" / "photo.png")).astype(int)
    assert np.array_equal(plain[:, :120], up[:, :120])
    assert np.abs(plain[:, 240:400] - up[:, 240:400]).max() > 10
    capsys.readouterr()
    assert main([*common[:-6], "--face-upsample", "--out", str(tmp_path / "no")]) == 2  # --upscale 1
    assert "needs --bg-upsampler" in capsys.readouterr().err


@pytest.mark.slow
def test_a_gfpgan_file_is_a_face_model_without_our_knobs(tmp_path, capsys):
    """GFPGANv1.4-clean's layout (random weights, 340 MB, so marked slow): spandrel reads it as a
    512-px face model; `--faces` runs it; `--quality` is refused in one line."""
    import matplotlib.cbook
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(0)
    net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                 num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    path = tmp_path / "GFPGANv1.4.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    del net
    d = files.describe(path)
    assert (d.kind, d.task, d.image_size, d.scale, d.quality) == ("GFPGAN", "faces", 512, 1, False)
    from iqpir.inference.photos import face_restorer_fn

    crops = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(6))
    ours = face_restorer_fn(iqpir.load(path, device="cpu", dtype="float32"))(crops)[0]
    assert float((ours - direct(path, crops[0])).abs().max()) <= 1e-4  # the face path is spandrel's output
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        Image.open(fh).convert("RGB").resize((240, 280), Image.LANCZOS).save(tmp_path / "face.png")
    common = ["restore", str(tmp_path / "face.png"), "--checkpoint", str(path), "--faces", "--detector", "hog",
              "--device", "cpu", "--dtype", "float32"]
    assert main([*common, "--quality", "0.5", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leave --quality out" in err, err
    assert main([*common, "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "face.png").size == (240, 280)


def test_a_cached_int8_graph_leaves_a_bg_upsampler_restore_alone(models, tmp_path, monkeypatch):
    """Without --faces, --bg-upsampler restores with that model alone: `auto` must not swap in the
    default model's cached int8 graph (it would then refuse its own --checkpoint)."""
    from iqpir import quantize

    asked = []
    monkeypatch.setattr(quantize, "int8_for", lambda *a, **k: asked.append(a) or types.SimpleNamespace(path="g.xml"))
    src = tmp_path / "in" / "p.png"
    io.write_image(src, torch.rand(3, 30, 44, generator=torch.Generator().manual_seed(5)))
    assert main(["restore", str(src), "--bg-upsampler", str(models["x2"]), "--upscale", "2",
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert (tmp_path / "o" / "p.png").is_file() and not asked
