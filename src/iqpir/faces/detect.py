"""Face detectors: an image -> faces with a box, five landmarks and a score.

Backends (imported lazily, so `import iqpir.faces` needs none of them):
- `DlibDetector` (extra `faces`: the prebuilt `dlib-bin` wheel, Boost licence, and the model
  files of `face-recognition-models`: dlib's MMOD face detector and 5-point landmark model,
  released into the public domain by their author). Models: "hog" (dlib's HOG frontal-face
  detector: fast, some false positives), "cnn" (the MMOD CNN on the whole image: accurate,
  slow on a CPU), "hog+cnn" (default: HOG proposes candidates with a low threshold, the MMOD
  CNN confirms each on a small crop around it: the CNN's precision at close to HOG's cost).
- `RetinaFaceDetector`: facexlib's RetinaFace, only when facexlib and its weights file are
  installed locally; nothing is ever downloaded.

Each backend names its landmark order and the 512x512 template those points are aligned to.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

# Where five landmarks go in a 512x512 aligned face: the templates of the face-restoration
# tools (facexlib's FaceRestoreHelper, used by GFPGAN and CodeFormer).
# RetinaFace-style points: eye centres (image left, image right), nose tip, mouth corners.
TEMPLATE_RETINAFACE_512 = np.array([
    [192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
    [201.26117, 371.41043], [313.08905, 371.15118],
])
# dlib's 5-point model: outer and inner corner of the eye on the image's right, outer and inner
# corner of the eye on the image's left, base of the nose. Published at 1024 px: halved.
TEMPLATE_DLIB5_512 = np.array([
    [686.77227723, 488.62376238], [586.77227723, 493.59405941], [337.91089109, 488.38613861],
    [437.95049505, 493.51485149], [513.58415842, 678.5049505],
]) / 2.0

DLIB5_NAMES = ("right_eye_outer", "right_eye_inner", "left_eye_outer", "left_eye_inner", "nose_base")
RETINAFACE_NAMES = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")  # image left/right

FACES_EXTRA = "pip install 'iqpir[faces]'"


@dataclass
class Face:
    """One detected face, in pixels of the image given to the detector.

    box: (x0, y0, x1, y1), reaching past the photo's edge for a face cut by it; landmarks:
    (5, 2) x, y in the detector's `landmark_names` order; score: the detector's confidence
    (each detector its own scale).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """The shorter side of the box, in pixels."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


@runtime_checkable
class FaceDetector(Protocol):
    """What `restore_photo` needs from a detector."""

    name: str
    template: np.ndarray  # (5, 2): where the five landmarks go in the 512x512 aligned crop
    landmark_names: tuple[str, ...]

    def detect(self, image: torch.Tensor) -> list[Face]:
        """(3, H, W) float in [0, 1] -> the faces found (any order)."""
        ...


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) C-contiguous uint8 (what dlib and OpenCV take)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return np.ascontiguousarray(arr.permute(1, 2, 0).numpy())


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def dedupe(faces: list[Face], iou: float = 0.5) -> list[Face]:
    """Drop faces that overlap a higher-scoring one by more than `iou`."""
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: -f.score):
        if all(_iou(f.box, k.box) <= iou for k in kept):
            kept.append(f)
    return kept


# --------------------------------------------------------------------------------------
# dlib
# --------------------------------------------------------------------------------------


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise ImportError(f"face detection with dlib needs the dlib-bin wheel: {FACES_EXTRA}") from exc
    return dlib


def dlib_model_file(name: str) -> Path:
    """Path of a model file shipped by the `face-recognition-models` package, found without
    importing it (its __init__ imports pkg_resources, gone from recent setuptools)."""
    roots: list[Path] = []
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    for root in roots:
        path = root / "models" / name
        if path.is_file():
            return path
    if not roots:
        raise ImportError(f"the dlib face models come from the face-recognition-models package: {FACES_EXTRA}")
    raise FileNotFoundError(f"{name} is missing from the face-recognition-models package in {roots[0]}; "
                            f"reinstall it: {FACES_EXTRA}")


def _resize_max_side(image: torch.Tensor, max_side: int) -> tuple[torch.Tensor, float]:
    """Shrink so the longer side is at most `max_side` (antialiased); returns the image and its scale."""
    h, w = image.shape[1:]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    if scale >= 1.0:
        return image, 1.0
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    return small, nw / w


class DlibDetector:
    """dlib face detection with the 5-point landmark model.

    Args:
        model: "hog+cnn" (default), "hog" or "cnn" (see the module docstring).
        upsample: times the detection image is doubled; the HOG detector finds faces of about
            80 px and more on the image it sees, 40 px with one upsampling.
        max_side: the photo is shrunk to at most this many pixels on its longer side for detection
            (landmarks are always placed on the full-size photo); 0 = never.
        threshold: minimum score: HOG's for "hog" (dlib's default 0), the CNN's for the others.
        candidate_threshold: HOG's threshold for proposing candidates to the CNN ("hog+cnn").
    """

    landmark_names = DLIB5_NAMES
    template = TEMPLATE_DLIB5_512
    # The CNN sees each candidate in a crop 1.5x its size, scaled so the face is 80 px: the
    # MMOD model's smallest face. Measured on the bundled photos' candidates: same verdicts as
    # a 2x crop at 100 px (faces ~1.0, non-faces nothing) in a third of the time.
    VERIFY_FACE_PX = 80
    VERIFY_CONTEXT = 0.75  # half the crop's side, in candidate sides

    def __init__(self, model: str = "hog+cnn", upsample: int = 1, max_side: int | None = None,
                 threshold: float = 0.0, candidate_threshold: float = -0.3):
        if model not in ("hog", "cnn", "hog+cnn"):
            raise ValueError(f"dlib detector model must be hog, cnn or hog+cnn, got {model!r}")
        dlib = _import_dlib()
        self.model = model
        self.name = f"dlib-{model}"
        self.upsample = int(upsample)
        self.max_side = (1024 if model == "cnn" else 2048) if max_side is None else int(max_side)
        self.threshold = float(threshold)
        self.candidate_threshold = float(candidate_threshold)
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
        self._hog = dlib.get_frontal_face_detector() if model != "cnn" else None
        self._cnn = (dlib.cnn_face_detection_model_v1(str(dlib_model_file("mmod_human_face_detector.dat")))
                     if model != "hog" else None)

    def _boxes(self, small: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes (x0, y0, x1, y1) and scores on the detection image."""
        if self.model == "cnn":
            return [((d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1), d.confidence)
                    for d in self._cnn(small, self.upsample) if d.confidence >= self.threshold]
        thr = self.threshold if self.model == "hog" else self.candidate_threshold
        rects, scores, _ = self._hog.run(small, self.upsample, thr)
        boxes = [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), s) for r, s in zip(rects, scores)]
        if self.model == "hog":
            return boxes
        return [v for v in (self._verify(small, box) for box, _ in boxes) if v is not None]

    def _verify(self, img: np.ndarray, box) -> tuple[tuple[float, float, float, float], float] | None:
        """Run the CNN on a crop around a HOG candidate; its best face whose centre is in the candidate."""
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0)
        half = self.VERIFY_CONTEXT * side
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        h, w = img.shape[:2]
        cx0, cy0 = max(0, int(cx - half)), max(0, int(cy - half))
        cx1, cy1 = min(w, math.ceil(cx + half)), min(h, math.ceil(cy + half))
        crop = torch.from_numpy(img[cy0:cy1, cx0:cx1]).permute(2, 0, 1).float() / 255
        f = self.VERIFY_FACE_PX / side
        size = (max(1, round(crop.shape[1] * f)), max(1, round(crop.shape[2] * f)))
        crop = F.interpolate(crop[None], size=size, mode="bilinear", antialias=f < 1, align_corners=False)[0]
        fx, fy = size[1] / (cx1 - cx0), size[0] / (cy1 - cy0)
        best = None
        for d in self._cnn(to_uint8_hwc(crop), 0):
            r = d.rect
            bx = ((r.left()) / fx + cx0, r.top() / fy + cy0, (r.right() + 1) / fx + cx0, (r.bottom() + 1) / fy + cy0)
            mx, my = (bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2
            inside = x0 <= mx <= x1 and y0 <= my <= y1
            if d.confidence >= self.threshold and inside and (best is None or d.confidence > best[1]):
                best = (bx, d.confidence)
        return best

    def detect(self, image: torch.Tensor) -> list[Face]:
        small_t, scale = _resize_max_side(image, self.max_side)
        small = to_uint8_hwc(small_t)
        full = small if scale == 1.0 else to_uint8_hwc(image)
        faces = []
        for (x0, y0, x1, y1), score in self._boxes(small):
            box = (x0 / scale, y0 / scale, x1 / scale, y1 / scale)
            rect = self._dlib.rectangle(round(box[0]), round(box[1]),
                                        round(box[2]) - 1, round(box[3]) - 1)
            shape = self._predictor(full, rect)
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append(Face(box=tuple(float(v) for v in box), landmarks=pts, score=float(score)))
        return dedupe(faces)


# --------------------------------------------------------------------------------------
# facexlib RetinaFace (optional; weights must be local)
# --------------------------------------------------------------------------------------

RETINAFACE_WEIGHTS = {"resnet50": "detection_Resnet50_Final.pth", "mobile0.25": "detection_mobilenet0.25_Final.pth"}


def _retinaface_weight_candidates(network: str) -> list[Path]:
    name = RETINAFACE_WEIGHTS[network]
    out = []
    env = os.environ.get("IQPIR_FACEXLIB_WEIGHTS")
    if env:
        out.append(Path(env) / name)
    facexlib = sys.modules.get("facexlib")  # imported by the caller
    out.extend(Path(p) / "weights" / name for p in getattr(facexlib, "__path__", []))
    out.append(Path("facexlib") / "weights" / name)  # where facexlib's own loader saves it, relative to the cwd
    return out


class RetinaFaceDetector:
    """facexlib's RetinaFace, from a local weights file (never downloaded).

    Args:
        weights: the .pth file; default: $IQPIR_FACEXLIB_WEIGHTS/NAME, then facexlib's own
            `weights/` folder, then ./facexlib/weights/NAME.
        network: "resnet50" (detection_Resnet50_Final.pth) or "mobile0.25".
        threshold: minimum confidence.
    facexlib places the network itself (on CUDA when there is one).
    """

    landmark_names = RETINAFACE_NAMES
    template = TEMPLATE_RETINAFACE_512

    def __init__(self, weights: str | os.PathLike | None = None, network: str = "resnet50", threshold: float = 0.9):
        if network not in RETINAFACE_WEIGHTS:
            raise ValueError(f"RetinaFace network must be one of {sorted(RETINAFACE_WEIGHTS)}, got {network!r}")
        try:
            from facexlib.detection.retinaface import RetinaFace
        except ImportError as exc:
            raise ImportError("the retinaface detector needs facexlib (pip install facexlib) and its weights "
                              f"file {RETINAFACE_WEIGHTS[network]}; or use the dlib detector: {FACES_EXTRA}") from exc
        if weights is None:
            candidates = _retinaface_weight_candidates(network)
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"RetinaFace weights {RETINAFACE_WEIGHTS[network]} not found (looked in "
                    f"{', '.join(str(p.parent) for p in candidates)}); copy the file into one of these folders or set "
                    "IQPIR_FACEXLIB_WEIGHTS to its folder (iqpir never downloads weights)")
            weights = found[0]
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"RetinaFace weights file not found: {weights}")
        from iqpir.checkpoint import read_pickled_tensors

        state = read_pickled_tensors(weights)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        net = RetinaFace(network_name=network, half=False)
        net.load_state_dict(state, strict=True)
        self.net = net.eval()
        self.name = f"retinaface-{network}"
        self.threshold = float(threshold)
        self.weights = weights

    @torch.inference_mode()
    def detect(self, image: torch.Tensor) -> list[Face]:
        bgr = to_uint8_hwc(image)[:, :, ::-1].astype(np.float32)  # facexlib takes OpenCV's BGR order
        rows = np.asarray(self.net.detect_faces(bgr, self.threshold))
        faces = []
        for row in rows.reshape(-1, 15):  # x0, y0, x1, y1, score, then five (x, y)
            faces.append(Face(box=tuple(float(v) for v in row[:4]), landmarks=row[5:15].reshape(5, 2).astype(np.float64),
                              score=float(row[4])))
        return faces


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------

DETECTORS = ("hog+cnn", "hog", "cnn", "retinaface")


@functools.lru_cache(maxsize=4)
def get_detector(name: str = "hog+cnn") -> FaceDetector:
    """A detector by name (cached): hog+cnn (default), hog, cnn (dlib), retinaface (facexlib)."""
    if name in ("hog", "cnn", "hog+cnn"):
        return DlibDetector(model=name)
    if name == "retinaface":
        return RetinaFaceDetector()
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")
