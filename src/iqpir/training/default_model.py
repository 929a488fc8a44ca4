"""The recipe of the packaged default model: data from OS packages, a quality-conditioned U-Net, hours on a CPU.

    python -m iqpir.training.default_model data  --work WORK      # fetch photos, crop, degrade, score
    python -m iqpir.training.default_model train --work WORK --steps N [--threads T] [--precision P]  # resumes exactly
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

Training is the `default-model` preset of ``iqpir.config`` run by the training package's loop
(``iqpir.training.loop.run``) with a ``RecipeTask`` (L1 to the target, the network conditioned on
its S). Sampling is a pure function of (seed, step), so a resumed run equals an uninterrupted one.
The work folder holds the crops and their scores, and is the loop's run folder: ``config.yaml``,
``metrics.csv``, ``checkpoints/`` (safetensors + JSON: model, optimiser, step, RNG states) and
``curve.jsonl`` (held-out PSNR and the S response against steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir import io
from iqpir.data.bundled import resize_long_side
from iqpir.data.degradations import degrade
from iqpir.plugin import PluginRecipe, QualityConditioned, conditioned_unet
from iqpir.training.data import to_device
from iqpir.training.loop import TrainOptions, TrainResult, run
from iqpir.training.tasks import RecipeTask
from iqpir.weights import DEFAULT_WEIGHTS

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
# The evaluation's: the default model's card, benchmarks/default_model.py and `make demo`.
EVAL_DEGRADATION = {"kernel_size": 21, "blur_sigma": [1.0, 3.0], "downsample": [2.0, 4.0], "noise": [0.0, 10.0],
                    "jpeg_quality": [50, 80]}
METRICS = ("niqe", "piqe")
EVAL_SIDE = 384


def build_network(cfg: C.UNetConfig) -> QualityConditioned:
    """The default network: ``iqpir.plugin.conditioned_unet(**asdict(cfg))`` (config model.unet)."""
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
    ckpt.save_tensors(out, {"images": (stack * 255).round().to(torch.uint8), "scores": scores})
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
# Training: the `default-model` preset of iqpir.config through the training package's loop
# --------------------------------------------------------------------------------------


def recipe_config(*overrides: str) -> C.RunConfig:
    """The default model's training config: the `default-model` preset, then dotted overrides."""
    return C.load(preset="default-model", overrides=list(overrides))


def sample_batch(images: torch.Tensor, scores: torch.Tensor, cfg: C.RunConfig,
                 step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch `step` of the run: (input, target, S), a pure function of (train.seed, step).

    train.batch_size crops of model.image_size px, each from a random crop and a target level
    drawn with LEVEL_WEIGHTS, flipped half the time; the input is a fresh draw of
    data.degradation applied to the crop's clean level, S the target's score. With
    data.clean_inputs > 0, that fraction of the pairs is (clean, clean, S uniform in [0, 1]).
    """
    n_batch, patch, degradation = cfg.train.batch_size, cfg.model.image_size, cfg.data.degradation
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    n = images.shape[0]
    idx = torch.randint(n, (n_batch,), generator=g)
    lvl = torch.multinomial(torch.tensor(LEVEL_WEIGHTS), n_batch, replacement=True, generator=g)
    span = images.shape[-1] - patch + 1
    ys, xs = torch.randint(span, (n_batch,), generator=g), torch.randint(span, (n_batch,), generator=g)
    flips = torch.rand(n_batch, generator=g) < 0.5
    clean, target = [], []
    for i, l, y, x, f in zip(idx.tolist(), lvl.tolist(), ys.tolist(), xs.tolist(), flips.tolist()):
        pair = images[i, [0, l], :, y:y + patch, x:x + patch].float() / 255
        if f:
            pair = pair.flip(-1)
        clean.append(pair[0])
        target.append(pair[1])
    lq = degrade(torch.stack(clean), degradation, generator=g)
    target, s = torch.stack(target), scores[idx, lvl]
    if cfg.data.clean_inputs > 0:  # drawn after the rest, so that 0 gives the batches it always gave
        keep = torch.rand(n_batch, generator=g) < cfg.data.clean_inputs
        lq, target = torch.where(keep[:, None, None, None], torch.stack(clean), lq), \
            torch.where(keep[:, None, None, None], torch.stack(clean), target)
        s = torch.where(keep, torch.rand(n_batch, generator=g), s)
    return lq, target, s


class CropBatches:
    """The loop's batch source over work/crops.safetensors: micro-batch m of step s on rank r is
    `sample_batch` at index (s * train.grad_accum + m) * world_size + r (one process: index s)."""

    def __init__(self, images: torch.Tensor, scores: torch.Tensor, cfg: C.RunConfig, info):
        self.images, self.scores, self.cfg, self.info = images, scores, cfg, info

    def batches(self, first_step: int):
        tc, info = self.cfg.train, self.info
        for step in range(first_step, tc.steps):
            for micro in range(tc.grad_accum):
                index = (step * tc.grad_accum + micro) * info.world_size + info.rank
                lq, hq, s = sample_batch(self.images, self.scores, self.cfg, index)
                yield to_device({"lq": lq, "hq": hq, "quality": s}, info.device)


class _Curve:
    """After each step: a log line every train.log_every steps; the held-out evaluation every
    train.eval_every steps and at the end, appended to work/curve.jsonl."""

    def __init__(self, work: Path, cfg: C.RunConfig, start: int):
        self.path, self.tc = work / "curve.jsonl", cfg.train
        self.model: torch.nn.Module | None = None  # the network being trained, once the loop built it
        self.refs = held_out(work)
        self.lqs = degraded_held_out(work, self.refs)
        self.window: list[float] = []
        self.t0, self.start = time.perf_counter(), start
        if self.path.exists():  # rows past the checkpoint a resumed run starts from are redone
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            io.atomic_write_text(self.path, "".join(f"{r}\n" for r in rows))

    def __call__(self, step: int, row: dict[str, float]) -> None:
        self.window.append(row["loss"])
        if step % self.tc.log_every == 0:
            rate = (step - self.start) / (time.perf_counter() - self.t0)
            log(f"step {step}/{self.tc.steps} l1 {sum(self.window) / len(self.window):.4f} lr {row['lr']:.2e} "
                f"{rate:.2f} steps/s")
            self.window = []
        if self.tc.eval_every and (step % self.tc.eval_every == 0 or step == self.tc.steps):
            self.model.eval()
            result = {"step": step, "wall_s": round(row["seconds"], 1), **evaluate(self.model, self.refs, self.lqs)}
            self.model.train()
            with self.path.open("a") as fh:
                fh.write(json.dumps(result) + "\n")
            log(f"eval at {step}: {result}")


def build_task(cfg: C.RunConfig) -> RecipeTask:
    """The default model as a task of the loop: the conditioned U-Net and its L1 term
    (train.l1_weight; twice the [0, 1] value with train.l1_range=signed)."""
    tc = cfg.train
    scale = 2.0 if tc.l1_range == "signed" else 1.0
    recipe = PluginRecipe(build_network(cfg.model.unet), l1_weight=tc.l1_weight * scale)
    return RecipeTask(recipe, arch="conditioned_unet", meta={"threads": torch.get_num_threads()})


def train(work: Path, cfg: C.RunConfig, threads: int = 2, stop_after: int | None = None,
          init: Path | None = None) -> TrainResult:
    """Train (or resume from the work folder's latest checkpoint) to train.steps.

    The work folder is the run folder of the loop (config.yaml, metrics.csv, checkpoints/).
    stop_after: stop (with a checkpoint) after this step, as an interruption would; the schedule
    is still train.steps long, so a resumed run equals an uninterrupted one.
    init: a new run starts from these weights (a sitting warm-started from the packaged model:
    `write` then adds the steps its card had); work/init.json records them.
    """
    if cfg.model.arch != "conditioned_unet":
        raise ValueError(f"the default model is a conditioned_unet, not model.arch={cfg.model.arch}")
    if (work / "last" / "state.json").exists() and not ckpt.list_checkpoints(work):
        raise FileExistsError(f"{work / 'last'} is a checkpoint of an earlier iqpir (torch.save optimiser); "
                              "start a new --work folder")
    torch.set_num_threads(threads)
    data = ckpt.load_tensors(work / "crops.safetensors")
    existing = ckpt.list_checkpoints(work)
    start = existing[-1][0] if existing else 0
    if existing:
        log(f"resuming at step {start}")
    curve = _Curve(work, cfg, start)
    if init is not None and not existing:
        io.atomic_write_text(work / "init.json", json.dumps(_init_record(Path(init))) + "\n")

    def setup(info):
        task = build_task(cfg)
        if init is not None and not existing:  # a resumed run takes its own checkpoint's weights
            task.generator.load_state_dict(ckpt.load_tensors(init), strict=True)
        curve.model = task.generator
        return task, CropBatches(data["images"], data["scores"], cfg, info)

    opts = TrainOptions(device="cpu", resume=bool(existing), progress=False, stop_at_step=stop_after, on_step=curve)
    return run(cfg, setup, work, opts)


def _init_record(init: Path) -> dict:
    """What a warm start began from: the weights' file, its SHA-256 and the steps its card (the
    .json beside it, as the packaged model has) says they had had."""
    card = init.with_suffix(".json")
    training = json.loads(card.read_text()).get("training", {}) if card.exists() else {}
    return {"weights": init.name, "sha256": hashlib.sha256(init.read_bytes()).hexdigest(),
            "steps_before": int(training.get("cumulative_steps", training.get("steps", 0)))}


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
    images = ckpt.load_tensors(work / "crops.safetensors")["images"]
    cfg = recipe_config().data.degradation
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


def trained_network(work: Path) -> tuple[QualityConditioned, C.RunConfig, dict]:
    """The network of the work folder's latest checkpoint -> (model in eval mode, its config, the checkpoint's JSON)."""
    tensors, meta = ckpt.load_checkpoint(work)
    cfg = C.from_dict(meta["config"])
    model = build_network(cfg.model.unet)
    model.load_state_dict(tensors["model"])
    return model.eval(), cfg, meta


def _training_card(cfg: C.RunConfig, meta: dict, machine: str | None) -> dict:
    """The card's "training" section: the recipe's settings, the steps done, the time they took."""
    tc, elapsed = cfg.train, meta.get("elapsed", {})
    settings = ("batch_size", "lr", "min_lr", "warmup_steps", "lr_schedule", "betas", "seed", "eval_every",
                "ckpt_every", "precision")
    threads = meta.get("task", {}).get("threads", "?")
    return {"config": "preset default-model (iqpir.config)", "patch": cfg.model.image_size,
            **{k: getattr(tc, k) for k in settings}, "steps": meta["step"], "scheduled_steps": tc.steps,
            "wall_s": round(elapsed.get("wall_s", 0.0)), "cpu_s": round(elapsed.get("cpu_s", 0.0)),
            "machine": machine or f"{cpu_name()}, {threads} torch thread(s)",
            "train_degradation": asdict(cfg.data.degradation.bfr), "level_weights": list(LEVEL_WEIGHTS),
            "clean_inputs": cfg.data.clean_inputs}


def _warm_start(work: Path, steps: int) -> dict:
    """The card's record of a warm-started sitting: where it began and the steps in all."""
    if not (work / "init.json").exists():
        return {}
    init = json.loads((work / "init.json").read_text())
    return {"warm_start": init, "cumulative_steps": init["steps_before"] + steps}


def write_model(work: Path, out: Path, machine: str | None = None) -> dict:
    """The trained network -> out/default.safetensors (float32 + metadata) and out/default.json (model card)."""
    model, cfg, state = trained_network(work)
    data = json.loads((work / "data.json").read_text())
    refs = held_out(work)
    curve_file = work / "curve.jsonl"
    curve = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()] if curve_file.exists() else []
    sweep = (0.0, 0.25, 0.5, 0.75, 1.0)
    results = {"moderate": evaluate(model, refs, degraded_held_out(work, refs), sweep),
               "heavy": evaluate(model, refs, heavy_held_out(work, refs), sweep)}
    network = asdict(cfg.model.unet)
    meta = {"format": "iqpir-default", "architecture": "conditioned_unet", "network": network,
            "quality": {"metrics": data["metrics"], "normalization": data["normalization"],
                        "constants": data["constants"]},
            "adain": False}
    card = {
        "name": "iqpir default model",
        "architecture": {
            "route": "plug-and-play quality conditioning (paper 4.3) of a U-Net",
            "builder": f"iqpir.plugin.conditioned_unet(**{network})",
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
        "training": _training_card(cfg, state, machine) | _warm_start(work, state["step"]),
        "recipe": "make default-model (python -m iqpir.training.default_model data|train|write --work WORK)",
        "results": {"held_out": sorted(refs), "eval_degradation": EVAL_DEGRADATION, "eval_side": EVAL_SIDE,
                    "judge": "mean of fixed-normalised NIQE and PIQE (higher is better)", **results},
        "curve": curve,
    }
    ckpt.save_tensors(out / "default.safetensors", model.state_dict(), metadata={"iqpir": json.dumps(meta)})
    io.atomic_write_text(out / "default.json", json.dumps(card, indent=1) + "\n")
    return card


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    defaults = recipe_config().train
    p = argparse.ArgumentParser(prog="python -m iqpir.training.default_model", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("data", "train", "pairs", "write"))
    p.add_argument("--out", type=Path, default=Path("src/iqpir/weights"), help="write: the weights' folder")
    p.add_argument("--machine", default=None, help="write: the training machine, for the card (default: this one)")
    p.add_argument("--work", type=Path, required=True, help="work folder (data, checkpoints, curves)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("float32", "bf16", "auto"), default=defaults.precision,
                   help="train: the forward pass's arithmetic (train.precision; auto: bf16 where the CPU has it natively)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="train: a new run starts from these weights ('default': the packaged model's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train: any other setting of the default-model preset (iqpir.config), e.g. train.lr=3e-4")
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
        cfg = recipe_config(f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
                            f"train.seed={args.seed}", f"train.precision={args.precision}", *args.overrides)
        init = DEFAULT_WEIGHTS if args.init == "default" else args.init
        train(args.work, cfg, threads=args.threads, init=None if init is None else Path(init))


if __name__ == "__main__":
    main()
