"""Seeded degradation pipelines: high-quality images -> synthetic low-quality images.

Every pipeline is a pure function

    fn(images: (N, 3, H, W) float in [0, 1], section, generator: torch.Generator)
        -> (N, 3, H, W) float32 in [0, 1], quantised to 8-bit levels

where `section` is the matching dataclass of `iqpir.config.DegradationConfig`. Each sample
draws its own parameters (uniformly from the configured [low, high] ranges) and its own noise
from `generator`, one sample after the other, so

- the same generator state gives the same bytes on CPU, and
- a batch gives the same result as its samples degraded one by one, in order, with the same
  generator (so the batch size does not change the data; bit-equal on our CPUs, though the
  batched blur of `bfr` may round differently from a one-image blur on other backends).

Every pipeline ends by rounding to 8-bit levels, so an image degraded on the fly in training
equals the one `degrade_files` writes to a PNG.

Presets (`DEGRADATIONS`, a plain dict):
    bfr         CodeFormer's stage-II blind-face degradation (blur, downsample, noise, JPEG)
    lowlight    exposure gain and gamma darkening, signal-dependent shot noise + read noise
    underwater  the simplified underwater image formation model I = J t + B (1 - t)
    backlit     an under-exposed subject in front of a bright, clipped background
"""

from __future__ import annotations

import hashlib
import io as _bytesio
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from iqpir.config import (
    BacklitDegradation,
    BFRDegradation,
    DegradationConfig,
    LowLightDegradation,
    UnderwaterDegradation,
)
from iqpir.io import (FileReport, ImageReadError, OutputLog, WriteError, check_batch, file_digest, plan_outputs, read_image,
                      write_image)

# --------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------


def _range(values: Sequence[float], name: str) -> tuple[float, float]:
    """Validate a [low, high] config range."""
    if len(values) != 2:
        raise ValueError(f"degradation.{name} must be [low, high], got {list(values)}")
    lo, hi = float(values[0]), float(values[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"degradation.{name} must be a finite [low, high] with low <= high, got {list(values)}")
    return lo, hi


def _uniform(generator: torch.Generator, values: Sequence[float], name: str) -> float:
    """One draw, uniform in the config range `values` (a float64 draw, so it is exact enough)."""
    lo, hi = _range(values, name)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device).item()
    return lo + (hi - lo) * u


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, moved to `device`."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and round to the 256 levels of an 8-bit file."""
    return x.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def _prepare(images: torch.Tensor) -> torch.Tensor:
    check_batch(images)
    return images.float().clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------
# bfr: CodeFormer stage II
# --------------------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> torch.Tensor:
    """A (size, size) float64 bivariate Gaussian kernel that sums to 1.

    k(p) ∝ exp(-p^T C^-1 p / 2) with covariance C = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T,
    p the pixel offset from the centre: the standard bivariate Gaussian, the form of the random
    blur kernels in BasicSR that CodeFormer's pipeline calls (also Wang et al., "Real-ESRGAN",
    ICCVW 2021, Eq. 2).
    The kernel is point-symmetric, so correlation (conv2d) and convolution agree.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be positive, got {sigma_x}, {sigma_y}")
    r = size // 2
    ax = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    # rotate offsets into the kernel's principal axes: u = R^T p
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def random_bfr_kernel(cfg: BFRDegradation, generator: torch.Generator) -> torch.Tensor:
    """CodeFormer's mixed kernel: isotropic or anisotropic with probability 1/2 each.

    Isotropic: one sigma in cfg.blur_sigma. Anisotropic: sigma_x and sigma_y drawn
    independently in cfg.blur_sigma and a rotation uniform in [-pi, pi].
    """
    iso = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device).item() < 0.5
    sx = _uniform(generator, cfg.blur_sigma, "bfr.blur_sigma")
    if iso:
        return gaussian_kernel(cfg.kernel_size, sx, sx, 0.0)
    sy = _uniform(generator, cfg.blur_sigma, "bfr.blur_sigma")
    theta = _uniform(generator, (-math.pi, math.pi), "bfr.rotation")
    return gaussian_kernel(cfg.kernel_size, sx, sy, theta)


def blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own kernel: (N, 3, H, W), (N, k, k) -> (N, 3, H, W).

    One grouped conv2d over the batch. The border is mirrored ("reflect", OpenCV's
    BORDER_REFLECT_101, the default of cv2.filter2D used by CodeFormer); an image not larger
    than half the kernel cannot be mirrored that far and is padded by replication instead.
    """
    n, c, h, w = images.shape
    k = kernels.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    x = F.pad(images.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(images.dtype).to(images.device).repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(x, weight, groups=n * c).reshape(n, c, h, w)


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress one (3, H, W) image in memory (PIL/libjpeg, deterministic) and decode it."""
    from PIL import Image

    arr = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = _bytesio.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        out = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(image.device)


def bfr(images: torch.Tensor, cfg: BFRDegradation, generator: torch.Generator) -> torch.Tensor:
    """CodeFormer's stage-II degradation (also IQPIR's), per sample:

    1. blur with a random mixed Gaussian kernel (cfg.kernel_size, iso/aniso 1/2 each,
       sigma in cfg.blur_sigma, rotation in [-pi, pi]);
    2. bilinear downsample by a scale uniform in cfg.downsample (to floor(H / scale) x
       floor(W / scale), at least 1 pixel; no antialiasing, like cv2.INTER_LINEAR);
    3. add Gaussian noise, sigma uniform in cfg.noise / 255, and clip to [0, 1];
    4. JPEG with an integer quality uniform in cfg.jpeg_quality, both ends included;
    5. bilinear resize back to H x W; round to 8-bit levels.

    Order and ranges from CodeFormer's `basicsr/data/ffhq_blind_dataset.py` (see
    notes/restoration-anchors.md 2.3); the code is ours. One deviation: CodeFormer draws the
    JPEG quality as int(uniform(30, 80)), so 80 is never drawn; here both ends are.
    """
    x = _prepare(images)
    n, _, h, w = x.shape
    q_lo, q_hi = _range(cfg.jpeg_quality, "bfr.jpeg_quality")
    if not (1 <= q_lo and q_hi <= 100):
        raise ValueError(f"degradation.bfr.jpeg_quality must lie in [1, 100], got {cfg.jpeg_quality}")
    # draw every parameter of a sample, then its noise, sample after sample
    kernels, outs = [], []
    params = []
    for _ in range(n):
        kernel = random_bfr_kernel(cfg, generator)
        scale = _uniform(generator, cfg.downsample, "bfr.downsample")
        if scale <= 0:
            raise ValueError(f"degradation.bfr.downsample must be positive, got {cfg.downsample}")
        sigma = _uniform(generator, cfg.noise, "bfr.noise") / 255.0
        small = (max(1, int(h // scale)), max(1, int(w // scale)))
        noise = _randn((3, *small), generator, x.device)
        quality = int(torch.randint(int(q_lo), int(q_hi) + 1, (), generator=generator, device=generator.device).item())
        kernels.append(kernel)
        params.append((small, sigma, noise, quality))
    blurred = blur(x, torch.stack(kernels))
    for i, (small, sigma, noise, quality) in enumerate(params):
        y = F.interpolate(blurred[i : i + 1], size=small, mode="bilinear", align_corners=False)
        y = (y + sigma * noise).clamp(0.0, 1.0)
        y = jpeg(y[0], quality)[None]
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        outs.append(y)
    return _quantize(torch.cat(outs))


# --------------------------------------------------------------------------------------
# lowlight
# --------------------------------------------------------------------------------------


def lowlight(images: torch.Tensor, cfg: LowLightDegradation, generator: torch.Generator) -> torch.Tensor:
    """Under-exposure with sensor noise, per sample:

        x = gain * J ** gamma                                  (darkening)
        I = clip(x + sqrt(k * x) * n1 + sigma_r * n2, 0, 1)    (noise), n1, n2 ~ N(0, 1)

    then 8-bit rounding. gain in cfg.exposure, gamma in cfg.gamma, k (shot-noise variance per
    unit signal) in cfg.shot_noise, sigma_r in cfg.read_noise.

    Darkening by gamma and a gain follows the synthetic low-light data of Lore et al.,
    "LLNet", Pattern Recognition 2017 and Lv et al., "MBLLEN", BMVC 2018. The noise is the
    Poissonian-Gaussian (heteroscedastic) model of Foi et al., "Practical Poissonian-Gaussian
    noise modeling and fitting for single-image raw-data", IEEE TIP 2008: variance
    k * x + sigma_r^2, here in display values (an approximation: the model is for raw data).
    gain = gamma = 1 with zero noise is the identity (up to 8-bit rounding).
    """
    x = _prepare(images)
    outs = []
    for i in range(x.shape[0]):
        gain = _uniform(generator, cfg.exposure, "lowlight.exposure")
        gamma = _uniform(generator, cfg.gamma, "lowlight.gamma")
        k = _uniform(generator, cfg.shot_noise, "lowlight.shot_noise")
        sigma_r = _uniform(generator, cfg.read_noise, "lowlight.read_noise")
        if gain < 0 or gamma <= 0 or k < 0 or sigma_r < 0:
            raise ValueError("degradation.lowlight: exposure, shot_noise and read_noise must be >= 0 and gamma > 0")
        n1 = _randn(x.shape[1:], generator, x.device)
        n2 = _randn(x.shape[1:], generator, x.device)
        dark = gain * x[i].pow(gamma)
        outs.append(dark + torch.sqrt(k * dark) * n1 + sigma_r * n2)
    return _quantize(torch.stack(outs))


# --------------------------------------------------------------------------------------
# underwater
# --------------------------------------------------------------------------------------


def underwater(images: torch.Tensor, cfg: UnderwaterDegradation, generator: torch.Generator) -> torch.Tensor:
    """The simplified underwater image formation model, per sample:

        I_c = J_c * t_c + B_c * (1 - t_c),   t_c = exp(-beta_c * d),   c in {R, G, B}

    (Jaffe-McGlamery in the single-coefficient form used by Chiang & Chen, "Underwater image
    enhancement by wavelength compensation and dehazing", IEEE TIP 2012; Akkaynak & Treibitz,
    "A Revised Underwater Image Formation Model", CVPR 2018, show that the direct signal and
    the backscatter really have different coefficients; one per channel is the usual
    simplification for synthetic data).

    Drawn per image: the range d (metres) in cfg.depth, made to vary linearly across the
    image along a random direction by a relative amount in cfg.depth_gradient
    (d(p) = d * (1 + g * ramp(p)), ramp in [-1/2, 1/2]); beta_R, beta_G, beta_B in their
    ranges (red absorbed fastest); the veiling light B = cfg.backscatter brightness times a
    blue-green colour (cfg.veil_red / veil_green / veil_blue). Depth 0 is the identity (up to
    8-bit rounding).
    """
    x = _prepare(images)
    n, _, h, w = x.shape
    # a centred coordinate grid in units of the image's longer side, for the depth ramp
    scale = float(max(h, w))
    ys = (torch.arange(h, dtype=torch.float32, device=x.device) - (h - 1) / 2) / scale
    xs = (torch.arange(w, dtype=torch.float32, device=x.device) - (w - 1) / 2) / scale
    outs = []
    for i in range(n):
        d = _uniform(generator, cfg.depth, "underwater.depth")
        g = _uniform(generator, cfg.depth_gradient, "underwater.depth_gradient")
        angle = _uniform(generator, (0.0, 2 * math.pi), "underwater.angle")
        beta = torch.tensor(
            [
                _uniform(generator, cfg.beta_red, "underwater.beta_red"),
                _uniform(generator, cfg.beta_green, "underwater.beta_green"),
                _uniform(generator, cfg.beta_blue, "underwater.beta_blue"),
            ],
            dtype=torch.float32,
            device=x.device,
        )
        brightness = _uniform(generator, cfg.backscatter, "underwater.backscatter")
        colour = torch.tensor(
            [
                _uniform(generator, cfg.veil_red, "underwater.veil_red"),
                _uniform(generator, cfg.veil_green, "underwater.veil_green"),
                _uniform(generator, cfg.veil_blue, "underwater.veil_blue"),
            ],
            dtype=torch.float32,
            device=x.device,
        )
        if d < 0 or bool((beta < 0).any()) or brightness < 0 or bool((colour < 0).any()):
            raise ValueError("degradation.underwater: depth, beta_*, backscatter and veil_* must be >= 0")
        veil = (brightness * colour).clamp(0.0, 1.0).view(3, 1, 1)
        # the ramp spans [-1/2, 1/2] over the image along the drawn direction
        ramp = math.cos(angle) * xs[None, :] + math.sin(angle) * ys[:, None]
        ramp = ramp / (ramp.abs().max().clamp_min(1e-12) * 2.0)
        depth = (d * (1.0 + g * ramp)).clamp_min(0.0)  # (H, W)
        t = torch.exp(-beta.view(3, 1, 1) * depth[None])  # (3, H, W)
        outs.append(x[i] * t + veil * (1.0 - t))
    return _quantize(torch.stack(outs))


# --------------------------------------------------------------------------------------
# backlit
# --------------------------------------------------------------------------------------


def subject_mask(
    h: int, w: int, generator: torch.Generator, size: Sequence[float], smoothness: float, device: torch.device
) -> torch.Tensor:
    """A smooth random blob in [0, 1] of shape (H, W): 1 on the subject, 0 on the background.

    An ellipse (semi-axes drawn in `size`, as fractions of the shorter side; centre in the
    middle half of the image; random rotation) whose radius is perturbed by three random
    low-order harmonics (so it is a blob, not a perfect ellipse), with a logistic edge of width
    `smoothness` (a fraction of the shorter side). Analytic, so it costs no large blur.
    """
    side = float(min(h, w))
    a = _uniform(generator, size, "backlit.subject_size")
    b = _uniform(generator, size, "backlit.subject_size")
    cy = _uniform(generator, (0.25, 0.75), "backlit.centre") * h
    cx = _uniform(generator, (0.25, 0.75), "backlit.centre") * w
    rot = _uniform(generator, (0.0, math.pi), "backlit.rotation")
    harmonics = [
        (k, _uniform(generator, (-0.08, 0.08), "backlit.blob"), _uniform(generator, (0.0, 2 * math.pi), "backlit.phase"))
        for k in (2, 3, 4)
    ]
    if a <= 0 or b <= 0:
        raise ValueError(f"degradation.backlit.subject_size must be positive, got {list(size)}")
    ys = (torch.arange(h, dtype=torch.float32, device=device)[:, None] - cy) / side
    xs = (torch.arange(w, dtype=torch.float32, device=device)[None, :] - cx) / side
    u = math.cos(rot) * xs + math.sin(rot) * ys
    v = -math.sin(rot) * xs + math.cos(rot) * ys
    r = torch.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the ellipse
    phi = torch.atan2(v / b, u / a)
    boundary = torch.ones_like(r)
    for k, amp, phase in harmonics:
        boundary = boundary + amp * torch.cos(k * phi + phase)
    # signed distance to the boundary, approximately, in units of the shorter side
    dist = (boundary - r) * min(a, b)
    return torch.sigmoid(dist / max(smoothness, 1e-6) * 4.0)


def backlit(images: torch.Tensor, cfg: BacklitDegradation, generator: torch.Generator) -> torch.Tensor:
    """A backlit scene, per sample: I = M * f_s(J) + (1 - M) * f_b(J), then 8-bit rounding.

    M is a smooth subject mask (`subject_mask`: a random blob of cfg.subject_size with a soft
    edge of width cfg.mask_smoothness), f_s(x) = g_s * x darkens the subject (g_s in
    cfg.subject_gain) and f_b(x) = min(1, g_b * x) brightens the background until it clips
    (g_b in cfg.background_gain), as when a camera exposes for a bright sky behind a subject
    (the situation of the BAID backlit data set of Liang et al., "Iterative prompt learning
    for unsupervised backlit image enhancement", ICCV 2023). This is a simple synthetic model
    of ours, not a published one. Both gains 1 is the identity (up to 8-bit rounding).
    """
    x = _prepare(images)
    n, _, h, w = x.shape
    outs = []
    for i in range(n):
        g_s = _uniform(generator, cfg.subject_gain, "backlit.subject_gain")
        g_b = _uniform(generator, cfg.background_gain, "backlit.background_gain")
        smooth = _uniform(generator, cfg.mask_smoothness, "backlit.mask_smoothness")
        if g_s < 0 or g_b < 0 or smooth < 0:
            raise ValueError("degradation.backlit: gains and mask_smoothness must be >= 0")
        m = subject_mask(h, w, generator, cfg.subject_size, smooth, x.device)[None]
        subject = g_s * x[i]
        background = (g_b * x[i]).clamp(max=1.0)
        outs.append(m * subject + (1.0 - m) * background)
    return _quantize(torch.stack(outs))


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

Degradation = Callable[[torch.Tensor, object, torch.Generator], torch.Tensor]

# name -> pipeline; the pipeline receives the DegradationConfig section of the same name.
DEGRADATIONS: dict[str, Degradation] = {
    "bfr": bfr,
    "lowlight": lowlight,
    "underwater": underwater,
    "backlit": backlit,
}


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def degrade(
    images: torch.Tensor,
    cfg: DegradationConfig,
    preset: str | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Degrade a batch with one preset.

    Args:
        images: (N, 3, H, W) float in [0, 1], any device.
        cfg: the DegradationConfig; `preset` (default cfg.preset) picks its section.
        generator: a torch.Generator (its state advances), an int seed, or None for torch's
            global generator (not reproducible unless torch.manual_seed was called).

    Returns:
        (N, 3, H, W) float32 in [0, 1] on the images' device, at 8-bit levels.
    """
    name = cfg.preset if preset is None else preset
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation preset {name!r}; choose one of {sorted(DEGRADATIONS)}")
    if generator is None:
        generator = torch.default_generator
    elif isinstance(generator, int):
        generator = make_generator(generator)
    return DEGRADATIONS[name](images, getattr(cfg, name, None), generator)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


# Output formats that keep the input's extension; other files are written as PNG.
WRITE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def file_seed(seed: int, digest: str) -> int:
    """A generator seed from the user's seed and a file's content digest (63 bits)."""
    h = hashlib.sha256(f"iqpir-degrade:{int(seed)}:{digest}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def degrade_files(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: DegradationConfig,
    preset: str | None = None,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> FileReport:
    """Degrade image files into `out_dir`, keeping their relative names and formats.

    Args:
        inputs: image files, folders (recursive; hidden folders are not inputs) and glob patterns.
        out_dir: the output folder (`io.plan_outputs`, the rule `iqpir restore` follows too):
            outputs mirror the inputs' paths, two inputs that would share an output are refused
            before any work, the folder must not be (or lie inside) an input folder, and no
            output may overwrite an input. A name whose format cannot be written (a.pgm) gets
            ".png" appended.
        cfg, preset: the degradation (preset default: cfg.preset).
        seed: each file's generator is seeded from (seed, sha256 of the file's bytes), so the
            same image and seed give the same output whatever the other inputs, their order
            or the file's name.
        overwrite: replace existing outputs; by default they are kept and counted as skipped.

    Alpha channels are carried over (except into JPEG); grey inputs give grey outputs and
    16-bit grey inputs 16-bit outputs. Unreadable files and inputs that match nothing are
    listed in `report.failed`; the rest are written. The summary is printed to stderr.
    """
    from tqdm import tqdm

    name = cfg.preset if preset is None else preset
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation preset {name!r}; choose one of {sorted(DEGRADATIONS)}")
    out = Path(out_dir)
    plan = plan_outputs(inputs, out, extensions=WRITE_EXTENSIONS)
    report = FileReport.empty()
    report.failed.extend(plan.failed + plan.unreadable)
    report.ignored = plan.ignored
    log = OutputLog(out)
    for i, (src, dst) in enumerate(tqdm(plan.pairs, desc=f"degrade ({name})", unit="img", disable=not progress,
                                        file=sys.stderr)):
        if not overwrite and log.complete(dst):
            report.skipped.append(src)
            continue
        try:
            loaded = read_image(src)
            digest = file_digest(src)
        except ImageReadError as exc:
            report.failed.append((str(src), exc.reason))
            continue
        except OSError as exc:
            report.failed.append((str(src), f"cannot read ({exc.strerror or exc})"))
            continue
        lq = degrade(loaded.rgb[None], cfg, name, make_generator(file_seed(seed, digest)))[0]
        try:
            write_image(dst, lq, alpha=loaded.alpha, grey=loaded.grey, bits=loaded.bits, log=log)
        except WriteError as exc:  # a full disk: stop; a rerun finishes the rest
            report.stop(src, exc, len(plan.pairs) - i - 1)
            break
        except ValueError as exc:
            report.failed.append((str(src), f"cannot write {dst}: {exc}"))
            continue
        report.done.append(dst)
    report.announce("degrade", "degraded", out)
    return report
