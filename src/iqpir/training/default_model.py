"""The recipe of the packaged default model: data from OS packages, a quality-conditioned U-Net, hours on a CPU.

    python -m iqpir.training.default_model data  --work WORK      # fetch photos, crop, degrade, score
    python -m iqpir.training.default_model train --work WORK --steps N [--threads T]   # resumes exactly
    python -m iqpir.training.default_model write --work WORK --out src/iqpir/weights   # weights + card

(`make default-model` runs the three.) The route is the paper's plug-and-play one (section 4.3,
Tables 7-9): quality conditioning s(S) added to the features of a restoration network that learns
fast, here a U-Net at half resolution (``iqpir.plugin.UNet(unshuffle=2)``), conditioned at its
bottleneck and inside every decoder block (``QualityConditioned`` with several features).

The data follow the paper's premise (section 3, "Beyond Ground-Truth"): ground truths of mixed
quality, each with its own score S. From every clean crop we make copies degraded to fixed levels
(``GT_LEVELS``) and score all of them with the built-in ensemble (NIQE + PIQE, min-max over the
set, as the authors normalise over FFHQ). A training pair is (input, target, S): the input is
always a fresh BFR degradation of the *clean* crop, the target is one of its quality levels, S
that target's score. The input therefore never tells which target is wanted; only S does, so the
network has to learn the condition (docs/results.md records why pairs degraded from the target
taught the demo nothing about S).

Sampling is a pure function of (seed, step), so a resumed run equals an uninterrupted one; the
work folder holds the crops, the scores, ``last/`` (model, optimiser, step) and ``curve.jsonl``
(held-out PSNR and the S response against steps).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from iqpir import config as C
from iqpir import io
from iqpir.data.bundled import resize_long_side
from iqpir.data.degradations import degrade
from iqpir.plugin import QualityConditioned, conditioned_unet

# Photos from Debian packages, fetched by package name (apt-get download + dpkg -x): (package,
# path inside the package, the file's licence in the package's debian/copyright; the lomiri
# photos' authors are in their file names). Illustrations and flat
# gradients of the same packages are left out: they teach little about photos.
PHOTOS = (
    *(("mate-backgrounds", f"usr/share/backgrounds/mate/nature/{n}.jpg", "GPL-2+") for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")),
    *(("plasma-workspace-wallpapers", f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg", "GPL-2+") for n in (
        "Autumn", "ColdRipple", "EveningGlow", "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path")),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_1A_by_freespace.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/greentock_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg", "CC0-1.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Dragonfly_by_Bolly.jpg", "CC-BY-SA-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/free_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_0B_by_freespace.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0"),
    ("lomiri-wallpapers-20.04", "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0"),
)
# Photos of the same packages kept out of training: the held-out set, with the demo's three.
HELD_OUT_PHOTOS = ("Kleiber_by_Lukas_Baubkus.jpg", "friends_by_Aitzol_Berasategi.jpg", "FreshFlower.jpg")
SKIMAGE_LICENCE = "public domain or CC0 (each image's docstring in skimage.data)"

CROP = 192          # stored crop side; NIQE/PIQE see whole 96-px blocks
SIDES = (1024, 512)  # each photo is resized (antialiased) to these long sides before cropping
# Ground-truth quality levels (blur sigma, downsampling, noise sigma /255, JPEG quality); level 0 is clean.
GT_LEVELS = ((1.0, 1.0, 3.0, 75), (1.8, 2.0, 6.0, 50), (2.8, 3.0, 10.0, 30))
LEVEL_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # how often each level is the target (the clean one most)
# The degradation the model undoes: wider than the evaluation's (blur 1-3, 2-4x, noise <= 10, JPEG 50-80).
TRAIN_DEGRADATION = {"kernel_size": 21, "blur_sigma": [0.5, 3.5], "downsample": [1.0, 4.0], "noise": [0.0, 12.0],
                     "jpeg_quality": [40, 90]}
# The evaluation's (issue 21): the default model's card, benchmarks/default_model.py and `make demo`.
EVAL_DEGRADATION = {"kernel_size": 21, "blur_sigma": [1.0, 3.0], "downsample": [2.0, 4.0], "noise": [0.0, 10.0],
                    "jpeg_quality": [50, 80]}
METRICS = ("niqe", "piqe")
EVAL_SIDE = 384


@dataclass
class NetworkConfig:
    """The default network: ``iqpir.plugin.conditioned_unet(**asdict(cfg))``."""

    channels: int = 24
    levels: int = 4
    unshuffle: int = 2
    embedding: str = "continuous"


def build_network(cfg: NetworkConfig) -> QualityConditioned:
    return conditioned_unet(**asdict(cfg))


def bfr_config(**values) -> C.DegradationConfig:
    return C.load(overrides=["data.degradation.preset=bfr", *(
        f"data.degradation.bfr.{k}={json.dumps(v)}" for k, v in values.items())]).data.degradation


def level_config(level: tuple[float, float, float, int]) -> C.DegradationConfig:
    sigma, scale, noise, q = level
    return bfr_config(kernel_size=21, blur_sigma=[sigma, sigma], downsample=[scale, scale], noise=[noise, noise],
                      jpeg_quality=[q, q])


def log(msg: str) -> None:
    print(f"[default-model] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _photo_name(package: str, path: str) -> str:
    return f"{package}/{path.split('/')[3] if 'contents' in path else Path(path).name}"


def photo_licences() -> dict[str, str]:
    """Training photo -> its licence (Debian packages, then scikit-image's bundled photos)."""
    from iqpir.data.bundled import TRAIN

    out = {_photo_name(p, path): lic for p, path, lic in PHOTOS if Path(path).name not in HELD_OUT_PHOTOS}
    return out | {f"skimage/{n}": SKIMAGE_LICENCE for n in TRAIN}


def fetch_packages(root: Path) -> Path:
    """apt-get download + dpkg -x each package of PHOTOS into root/debs, root/tree (once)."""
    tree = root / "tree"
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for package in sorted({p for p, _, _ in PHOTOS}):
        if list(debs.glob(f"{package}_*.deb")):
            continue
        if shutil.which("apt-get") is None:
            raise RuntimeError("fetching the training photos needs apt-get (Debian's packages); "
                               f"put {package}'s .deb in {debs} by hand")
        log(f"apt-get download {package}")
        done = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed (run `apt-get update` first?): "
                               f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
    return tree


def _resize_long(img: torch.Tensor, side: int) -> torch.Tensor:
    """Down-sized (antialiased) so the long side is `side`; smaller images as they are."""
    return resize_long_side(img, side) if max(img.shape[-2:]) > side else img


def _grid_crops(img: torch.Tensor, crop: int) -> list[torch.Tensor]:
    h, w = img.shape[-2:]
    ny, nx = h // crop, w // crop
    oy, ox = (h - ny * crop) // 2, (w - nx * crop) // 2
    return [img[:, oy + i * crop:oy + (i + 1) * crop, ox + j * crop:ox + (j + 1) * crop]
            for i in range(ny) for j in range(nx)]


def training_photos(root: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> ((3, H, W) clean photo, licence): the Debian photos and the demo's scikit-image photos."""
    from iqpir.data.bundled import TRAIN, bundled_images

    tree = fetch_packages(root)
    photos = {}
    for package, path, licence in PHOTOS:
        if Path(path).name in HELD_OUT_PHOTOS:
            continue
        photos[_photo_name(package, path)] = (io.load_rgb(tree / path), licence)
    bundled = bundled_images()
    for name in TRAIN:
        photos[f"skimage/{name}"] = (bundled[name], SKIMAGE_LICENCE)
    return photos


def build_data(work: Path, seed: int = 0, batch: int = 64) -> dict:
    """Crops, their quality levels and scores -> work/crops.safetensors, work/data.json."""
    from iqpir.iqa import QualityEnsemble

    out = work / "crops.safetensors"
    if out.exists():
        return json.loads((work / "data.json").read_text())
    photos = training_photos(work / "packages")
    crops, sources = [], []
    for name, (img, _) in photos.items():
        for side in SIDES:
            for c in _grid_crops(_resize_long(img, side), CROP):
                if c.std() > 0.03:  # flat sky and walls teach nothing
                    crops.append(c)
                    sources.append(name)
    clean = torch.stack(crops)
    log(f"{len(crops)} crops of {CROP} px from {len(photos)} photos; degrading to {len(GT_LEVELS)} levels")
    levels = [clean]
    for k, level in enumerate(GT_LEVELS, 1):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        levels.append(torch.cat([degrade(clean[i:i + batch], level_config(level), generator=g)
                                 for i in range(0, len(clean), batch)]))
    stack = torch.stack(levels, dim=1)  # (N, L+1, 3, CROP, CROP)
    log("scoring every ground truth with the ensemble (NIQE, PIQE)")
    ens = QualityEnsemble(list(METRICS), normalization="minmax")
    flat = stack.flatten(0, 1)
    raw = {m: [] for m in METRICS}
    for i in range(0, len(flat), batch):
        for m, v in ens.raw(flat[i:i + batch]).items():
            raw[m].append(v)
    raw = {m: torch.cat(v) for m, v in raw.items()}
    constants = ens.fit_minmax(raw)
    scores = ens.normalize_raw(raw).view(len(clean), len(levels)).float()
    save_file({"images": (stack * 255).round().to(torch.uint8).contiguous(), "scores": scores.contiguous()}, out)
    info = {
        "crops": len(crops), "crop": CROP, "sides": list(SIDES), "levels": [list(x) for x in GT_LEVELS],
        "metrics": list(METRICS), "normalization": "minmax", "constants": constants,
        "mean_score_per_level": [round(float(v), 4) for v in scores.mean(0)],
        "photos": {name: lic for name, (_, lic) in photos.items()},
        "crops_per_photo": {n: sources.count(n) for n in photos},
        "held_out": [*HELD_OUT_PHOTOS, "skimage/astronaut", "skimage/coffee", "matplotlib/grace_hopper"],
    }
    io.atomic_write_text(work / "data.json", json.dumps(info, indent=1))
    log(f"scores per level (mean S): {info['mean_score_per_level']}")
    return info


def held_out(work: Path) -> dict[str, torch.Tensor]:
    """The held-out photos at EVAL_SIDE (cached as PNG): never trained on."""
    folder = work / "heldout" / "reference"
    if not folder.exists():
        from iqpir.data.bundled import HELD_OUT, bundled_images

        tree = fetch_packages(work / "packages")
        imgs = {}
        for package, path, _ in PHOTOS:
            name = Path(path).name
            if name in HELD_OUT_PHOTOS:
                imgs[Path(name).stem] = io.load_rgb(tree / path)
        imgs.update({n: im for n, im in bundled_images().items() if n in HELD_OUT})
        for name, img in imgs.items():
            img = _resize_long(img, EVAL_SIDE)
            h, w = (s - s % 8 for s in img.shape[-2:])
            io.write_image(folder / f"{name}.png", img[:, :h, :w])
    return {p.stem: io.load_rgb(p) for p in sorted(folder.glob("*.png"))}


def degraded_held_out(work: Path, refs: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    folder = work / "heldout" / "degraded"
    if not folder.exists():
        cfg = bfr_config(**EVAL_DEGRADATION)
        for i, (name, ref) in enumerate(refs.items()):
            io.write_image(folder / f"{name}.png", degrade(ref[None], cfg, generator=seed * 1000 + i)[0])
    return {name: io.load_rgb(folder / f"{name}.png") for name in refs}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 20000
    batch: int = 8
    patch: int = 128
    lr: float = 5e-4
    min_lr: float = 2e-5
    warmup: int = 200
    seed: int = 0
    eval_every: int = 1000
    ckpt_every: int = 250


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def sample_batch(images: torch.Tensor, scores: torch.Tensor, cfg: TrainConfig, step: int,
                 degradation: C.DegradationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch `step` of the run: (input, target, S), a pure function of (cfg.seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    n = images.shape[0]
    idx = torch.randint(n, (cfg.batch,), generator=g)
    lvl = torch.multinomial(torch.tensor(LEVEL_WEIGHTS), cfg.batch, replacement=True, generator=g)
    span = images.shape[-1] - cfg.patch + 1
    ys, xs = torch.randint(span, (cfg.batch,), generator=g), torch.randint(span, (cfg.batch,), generator=g)
    flips = torch.rand(cfg.batch, generator=g) < 0.5
    clean, target = [], []
    for i, l, y, x, f in zip(idx.tolist(), lvl.tolist(), ys.tolist(), xs.tolist(), flips.tolist()):
        pair = images[i, [0, l], :, y:y + cfg.patch, x:x + cfg.patch].float() / 255
        if f:
            pair = pair.flip(-1)
        clean.append(pair[0])
        target.append(pair[1])
    lq = degrade(torch.stack(clean), degradation, generator=g)
    return lq, torch.stack(target), scores[idx, lvl]


def _save(folder: Path, model, opt, step: int, cfg: TrainConfig, net: NetworkConfig, spent: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "train": asdict(cfg), "network": asdict(net),
                                                "threads": torch.get_num_threads(), **spent}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def train(work: Path, cfg: TrainConfig, net_cfg: NetworkConfig, threads: int = 2, stop_after: int | None = None) -> None:
    """Train (or resume from work/last) to cfg.steps; evaluate every cfg.eval_every steps.

    stop_after: stop (with a checkpoint) after this step, as an interruption would; the schedule
    is still cfg.steps long, so a resumed run equals an uninterrupted one.
    """
    torch.set_num_threads(threads)
    data = load_file(work / "crops.safetensors")
    images, scores = data["images"], data["scores"]
    torch.manual_seed(cfg.seed)
    model = build_network(net_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    start, before = 0, {"wall_s": 0.0, "cpu_s": 0.0}
    last = work / "last"
    if (last / "state.json").exists():
        state = json.loads((last / "state.json").read_text())
        model.load_state_dict(load_file(last / "model.safetensors"))
        opt.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        start = state["step"]
        before = {k: state.get(k, 0.0) for k in before}
        log(f"resuming at step {start}")
    degradation = bfr_config(**TRAIN_DEGRADATION)
    refs = held_out(work)
    lqs = degraded_held_out(work, refs)
    curve = work / "curve.jsonl"
    t0, c0, window = time.perf_counter(), time.process_time(), []
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        lq, target, s = sample_batch(images, scores, cfg, step, degradation)
        loss = (model(lq, s) - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        done = step + 1
        if done % 50 == 0:
            rate = (done - start) / (time.perf_counter() - t0)
            log(f"step {done}/{cfg.steps} l1 {sum(window) / len(window):.4f} lr {lr_at(cfg, step):.2e} "
                f"{rate:.2f} steps/s")
            window = []
        if done % cfg.ckpt_every == 0 or done == end:
            spent = {"wall_s": before["wall_s"] + time.perf_counter() - t0,
                     "cpu_s": before["cpu_s"] + time.process_time() - c0}
            _save(last, model, opt, done, cfg, net_cfg, spent)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            row = {"step": done, "wall_s": round(before["wall_s"] + time.perf_counter() - t0, 1),
                   **evaluate(model, refs, lqs)}
            model.train()
            with curve.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            log(f"eval at {done}: {row}")


@torch.no_grad()
def evaluate(model, refs: dict[str, torch.Tensor], lqs: dict[str, torch.Tensor],
             sweep=(0.0, 0.5, 1.0)) -> dict:
    """Held-out means: PSNR/SSIM of input and of the S = 1 restoration; judge quality at each S."""
    from iqpir.iqa import QualityEnsemble
    from iqpir.metrics import psnr, ssim

    judge = QualityEnsemble(list(METRICS), normalization="fixed")
    rows = {"input": [], **{s: [] for s in sweep}}
    for name, ref in refs.items():
        lq = lqs[name][None]
        rows["input"].append((lq, ref[None]))
        for s in sweep:
            rows[s].append((model(lq, s).clamp(0, 1), ref[None]))

    def summary(pairs):
        return {"psnr": sum(float(psnr(x, y)) for x, y in pairs) / len(pairs),
                "ssim": sum(float(ssim(x, y)) for x, y in pairs) / len(pairs),
                "quality": sum(float(judge(x)) for x, _ in pairs) / len(pairs)}

    out = {"input": summary(rows["input"])}
    for s in sweep:
        out[f"S={s}"] = summary(rows[s])
    return {k: {m: round(v, 4) for m, v in d.items()} for k, d in out.items()}


def write_pairs(work: Path, seed: int = 0) -> Path:
    """The same data as folders for `iqpir train` (the IQPIR arm of the comparison).

    work/pairs/hq/NNNN_Lk.png is quality level k of crop NNNN, work/pairs/lq/NNNN_Lk.png one fixed
    draw of the training degradation of the *clean* crop NNNN: pairs whose input never tells the
    target's level, as in `train`. Score hq/ with `iqpir score` (NIQE, PIQE, min-max) for S.
    """
    root = work / "pairs"
    if (root / "lq").exists():
        return root
    images = load_file(work / "crops.safetensors")["images"]
    cfg = bfr_config(**TRAIN_DEGRADATION)
    for i in range(len(images)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        clean = images[i, 0].float()[None] / 255
        for k in range(images.shape[1]):
            io.write_image(root / "hq" / f"{i:04d}_L{k}.png", images[i, k].float() / 255)
            io.write_image(root / "lq" / f"{i:04d}_L{k}.png", degrade(clean, cfg, generator=g)[0])
    return root


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def heavy_held_out(work: Path, refs: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The held-out photos through `iqpir degrade`'s default (heavy) preset."""
    folder = work / "heldout" / "heavy"
    if not folder.exists():
        cfg = C.RunConfig().data.degradation
        for i, (name, ref) in enumerate(refs.items()):
            io.write_image(folder / f"{name}.png", degrade(ref[None], cfg, generator=seed * 1000 + i)[0])
    return {name: io.load_rgb(folder / f"{name}.png") for name in refs}


def write_model(work: Path, out: Path, machine: str | None = None) -> dict:
    """The trained network -> out/default.safetensors (float32 + metadata) and out/default.json (model card)."""
    state = json.loads((work / "last" / "state.json").read_text())
    net_cfg = NetworkConfig(**state["network"])
    model = build_network(net_cfg)
    model.load_state_dict(load_file(work / "last" / "model.safetensors"))
    model.eval()
    data = json.loads((work / "data.json").read_text())
    refs = held_out(work)
    curve_file = work / "curve.jsonl"
    curve = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()] if curve_file.exists() else []
    sweep = (0.0, 0.25, 0.5, 0.75, 1.0)
    results = {"moderate": evaluate(model, refs, degraded_held_out(work, refs), sweep),
               "heavy": evaluate(model, refs, heavy_held_out(work, refs), sweep)}
    wall = state.get("wall_s") or (curve[-1]["wall_s"] if curve else 0.0)
    meta = {"format": "iqpir-default", "architecture": "conditioned_unet", "network": asdict(net_cfg),
            "quality": {"metrics": data["metrics"], "normalization": data["normalization"],
                        "constants": data["constants"]},
            "adain": False}
    card = {
        "name": "iqpir default model",
        "architecture": {
            "route": "plug-and-play quality conditioning (paper 4.3) of a U-Net",
            "builder": f"iqpir.plugin.conditioned_unet(**{asdict(net_cfg)})",
            "parameters": sum(p.numel() for p in model.parameters()),
            "input": "RGB in [0, 1], any size (padded to a multiple of "
                     f"{model.network.multiple}); output the same size",
            "knobs": {"quality": "S in [0, 1], 1 = the best quality it learnt", "alpha": None, "fidelity": None},
            "adain": "not applied: AdaIN re-normalises a codebook latent to the input's; this network has no "
                     "codebook latent (docs/recipe.md)",
        },
        "data": {**{k: data[k] for k in ("crops", "crop", "sides", "levels", "metrics", "normalization", "constants",
                                          "mean_score_per_level", "held_out")},
                 "photos": photo_licences(), "crops_per_photo": data["crops_per_photo"]},
        "training": {**state["train"], "steps": state["step"], "scheduled_steps": state["train"]["steps"],
                     "wall_s": round(wall), "cpu_s": round(state["cpu_s"]) if "cpu_s" in state else None,
                     "machine": machine or f"{cpu_name()}, {state.get('threads', '?')} torch thread(s)",
                     "train_degradation": TRAIN_DEGRADATION, "level_weights": list(LEVEL_WEIGHTS)},
        "recipe": "make default-model (python -m iqpir.training.default_model data|train|write --work WORK)",
        "results": {"held_out": sorted(refs), "eval_degradation": EVAL_DEGRADATION, "eval_side": EVAL_SIDE,
                    "judge": "mean of fixed-normalised NIQE and PIQE (higher is better)", **results},
        "curve": curve,
    }
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, out / "default.safetensors", metadata={"iqpir": json.dumps(meta)})
    io.atomic_write_text(out / "default.json", json.dumps(card, indent=1) + "\n")
    return card


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m iqpir.training.default_model", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("data", "train", "pairs", "write"))
    p.add_argument("--out", type=Path, default=Path("src/iqpir/weights"), help="write: the weights' folder")
    p.add_argument("--machine", default=None, help="write: the training machine, for the card (default: this one)")
    p.add_argument("--work", type=Path, required=True, help="work folder (data, checkpoints, curves)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "data":
        build_data(args.work, seed=args.seed)
        degraded_held_out(args.work, held_out(args.work))
    elif args.command == "write":
        card = write_model(args.work, args.out, machine=args.machine)
        print(json.dumps(card["results"]["moderate"], indent=1))
    elif args.command == "pairs":
        print(write_pairs(args.work, seed=args.seed))
    else:
        train(args.work, TrainConfig(steps=args.steps, eval_every=args.eval_every, seed=args.seed), NetworkConfig(),
              threads=args.threads)


if __name__ == "__main__":
    main()
