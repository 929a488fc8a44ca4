"""Whole-photo face restoration: alignment is an exact similarity, paste-back its exact inverse,
detection finds the bundled faces and no others, the CLI writes photos and restore.json."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from iqpir import io
from iqpir.faces import (
    TEMPLATE_DLIB5_512,
    TEMPLATE_RETINAFACE_512,
    Face,
    align_face,
    invert_affine,
    resize_lanczos,
    restore_photo,
    similarity_from_points,
    warp_affine,
)
from iqpir.faces.align import apply_affine, compose
from iqpir.faces.detect import DLIB5_NAMES
from train_helpers import SMALL_MODEL


pytestmark = pytest.mark.usefixtures("one_thread")


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def face_at(centre, scale: float, angle: float, template=TEMPLATE_DLIB5_512) -> Face:
    """A face whose landmarks are the template moved by an exact similarity (crop centre -> `centre`)."""
    m = compose(similarity(angle, scale, centre[0], centre[1]), similarity(0, 1, -256, -256))
    pts = apply_affine(m, template)
    half = 130 * scale
    return Face(box=(centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half), landmarks=pts, score=1.0)


class FixedDetector:
    """Returns the faces it was given: tests of alignment and paste-back without a detector."""

    name = "fixed"
    template = TEMPLATE_DLIB5_512
    landmark_names = DLIB5_NAMES

    def __init__(self, faces):
        self.faces = faces

    def detect(self, image):
        return list(self.faces)


def smooth_photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random photo in [0.2, 0.8] (low frequencies only)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(2, h // 40), max(2, w // 40), generator=g)
    return (0.2 + 0.6 * F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0]).clamp(0, 1)


# --------------------------------------------------------------------------------------
# geometry (no detector needed)
# --------------------------------------------------------------------------------------


def test_similarity_fit_recovers_a_known_transform():
    true = similarity(-37.0, 0.42, 81.5, -12.25)
    src = np.random.default_rng(0).uniform(0, 500, (5, 2))
    fit = similarity_from_points(src, apply_affine(true, src))
    np.testing.assert_allclose(fit, true, atol=1e-9)
    np.testing.assert_allclose(compose(invert_affine(fit), fit), similarity(0, 1, 0, 0), atol=1e-12)
    # least squares: noisy points still give a similarity (orthogonal linear part, no shear or reflection)
    noisy = apply_affine(true, src) + np.random.default_rng(1).normal(0, 2, (5, 2))
    lin = similarity_from_points(src, noisy)[:, :2]
    assert abs(lin[0, 0] - lin[1, 1]) < 1e-12 and abs(lin[0, 1] + lin[1, 0]) < 1e-12 and np.linalg.det(lin) > 0


@pytest.mark.parametrize("scale,tol", [(0.3, 3.0), (1.0, 0.5), (2.5, 0.5)])
def test_warp_and_inverse_warp_round_trip(scale, tol):
    """A smooth photo warped into a crop and back with the inverse transform is the photo again
    (to `tol`/255; shrinking into the crop low-passes first, hence the looser 0.3)."""
    img = smooth_photo(300, 400)
    to_crop = similarity(23.0, scale, 40.0, -30.0)
    size = (int(300 * scale) + 80, int(400 * scale) + 80)
    crop = warp_affine(img, invert_affine(to_crop), size, padding="zeros")
    back = warp_affine(crop, to_crop, (300, 400), padding="zeros")
    # compare where the photo went into the crop: away from the crop's and the photo's edges
    ys, xs = torch.meshgrid(torch.arange(300.0), torch.arange(400.0), indexing="ij")
    cx = to_crop[0, 0] * xs + to_crop[0, 1] * ys + to_crop[0, 2]
    cy = to_crop[1, 0] * xs + to_crop[1, 1] * ys + to_crop[1, 2]
    inside = (cx > 4) & (cx < size[1] - 5) & (cy > 4) & (cy < size[0] - 5)
    inside &= (xs > 5) & (xs < 394) & (ys > 5) & (ys < 294)
    assert inside.float().mean() > 0.5
    err = (back - img).abs().amax(0)[inside]
    assert err.max() < tol / 255 and err.mean() < tol / 4 / 255


def test_warp_with_identity_is_exact():
    img = torch.rand(3, 37, 53)
    out = warp_affine(img, similarity(0, 1, 0, 0), (37, 53))
    assert (out - img).abs().max() < 1e-5


def _marks(template: np.ndarray, sigma: float = 5.0) -> torch.Tensor:
    """(1, 512, 512): a Gaussian dot at each template landmark."""
    ys, xs = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    dots = sum(torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in template)
    return dots[None]


def _centroid(change: torch.Tensor, x: float, y: float, radius: int) -> tuple[float, float]:
    """Intensity-weighted centre of |change| in a window around (x, y)."""
    h, w = change.shape
    x0, x1 = max(0, int(x) - radius), min(w, int(x) + radius + 2)
    y0, y1 = max(0, int(y) - radius), min(h, int(y) + radius + 2)
    win = change[y0:y1, x0:x1].abs().double()
    ys, xs = torch.meshgrid(torch.arange(y0, y1).double(), torch.arange(x0, x1).double(), indexing="ij")
    return float((win * xs).sum() / win.sum()), float((win * ys).sum() / win.sum())


@pytest.mark.parametrize("scale,angle,centre,upscale", [
    (0.4, 0.0, (200.0, 150.0), 1),      # a small face: the crop is shrunk back into the photo
    (0.45, 35.0, (420.0, 160.0), 1),    # a rotated face
    (1.3, -20.0, (250.0, 300.0), 1),    # a face larger than the crop
    (0.4, 10.0, (470.0, 40.0), 1),      # at the border: most of its crop lies outside the photo
    (0.4, 25.0, (200.0, 150.0), 2),     # upscaled output
])
def test_pasted_marks_land_on_the_landmarks(scale, angle, centre, upscale):
    """Dots drawn at the template's landmarks in the crop come back at the face's landmarks in
    the photo: paste-back is the exact inverse of the alignment (to a fraction of a pixel)."""
    photo = torch.full((3, 360, 500), 0.3)
    face = face_at(centre, scale, angle)
    dots = 0.5 * _marks(TEMPLATE_DLIB5_512)
    out, rep = restore_photo(photo, lambda x: x + dots, detector=FixedDetector([face]), upscale=upscale)
    assert out.shape == (3, 360 * upscale, 500 * upscale)
    change = (out - resize_lanczos(photo, upscale))[0]
    sigma_out = 5.0 * scale * upscale
    for x, y in face.landmarks:
        ex, ey = (x + 0.5) * upscale - 0.5, (y + 0.5) * upscale - 0.5
        if not (3 * sigma_out < ex < out.shape[2] - 3 * sigma_out and 3 * sigma_out < ey < out.shape[1] - 3 * sigma_out):
            continue
        cx, cy = _centroid(change, ex, ey, radius=max(3, int(3 * sigma_out)))
        assert math.hypot(cx - ex, cy - ey) < 0.25, (cx, cy, ex, ey)
    assert rep["faces"][0]["landmarks"][0] == [round(face.landmarks[0][0], 2), round(face.landmarks[0][1], 2)]


def test_paste_leaves_far_pixels_alone_and_blends_overlaps():
    photo = smooth_photo(300, 420)
    a, b = face_at((150.0, 150.0), 0.35, 0.0), face_at((205.0, 160.0), 0.35, 15.0)  # overlapping crops
    out, rep = restore_photo(photo, lambda x: (x + 0.2).clamp(0, 1), detector=FixedDetector([b, a]))
    assert [f["box"][0] for f in rep["faces"]] == sorted(f["box"][0] for f in rep["faces"])  # left to right
    diff = (out - photo).abs().amax(0)
    assert diff[:, 350:].max() == 0 and diff[:30].max() == 0  # outside both crops: untouched
    assert diff[150, 150] > 0.15 and diff[160, 205] > 0.15  # face centres: the change arrives
    assert out.max() <= 1 and out.min() >= 0
    # where the two soft masks overlap the change is blended, never added twice
    assert (out - photo).amax() <= 0.2 + 2e-3
    # feathered: no seam, the change fades in over many pixels
    change = (out - photo).mean(0)
    assert change.diff(dim=0).abs().max() < 0.03 and change.diff(dim=1).abs().max() < 0.03


@pytest.mark.parametrize("scale", [0.35, 0.8])
def test_a_denoising_restorer_denoises_the_photo(scale):
    """A restorer that returns the clean crop gives back the clean photo: the change is mapped
    back exactly, not low-passed (a plain inverse warp leaves most of the pixel noise)."""
    clean = smooth_photo(240, 300, seed=5)
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    face = face_at((150.0, 120.0), scale, 12.0)
    clean_crop, _ = align_face(clean, face.landmarks, TEMPLATE_DLIB5_512)
    out, _ = restore_photo(noisy, lambda x: clean_crop[None], detector=FixedDetector([face]))
    core = (slice(None), slice(120 - int(60 * scale), 120 + int(60 * scale)),
            slice(150 - int(60 * scale), 150 + int(60 * scale)))  # where the mask is 1
    assert (noisy - clean)[core].std() > 0.04
    assert (out - clean)[core].abs().max() < 2 / 255


def test_identity_restorer_returns_the_photo_exactly_with_synthetic_faces():
    photo = torch.rand(3, 200, 260, generator=torch.Generator().manual_seed(3))
    faces = [face_at((60.0, 70.0), 0.3, 30.0), face_at((250.0, 190.0), 0.5, -10.0)]  # one at the corner
    out, _ = restore_photo(photo, lambda x: x, detector=FixedDetector(faces))
    assert (out - photo).abs().max() <= 1 / 255
    out2, _ = restore_photo(photo, lambda x: x, detector=FixedDetector(faces), upscale=3)
    assert (out2 - resize_lanczos(photo, 3)).abs().max() <= 1 / 255


def test_with_a_background_function_the_face_blends_from_the_photo_into_the_background():
    """out = bg + M (U - bg) + change: outside the face's crop exactly the background function's
    output; where the mask is 1 the photo itself (identity restorer) or the photo plus the
    restorer's change; in between, each pixel between the photo and the background."""
    photo = smooth_photo(240, 360, seed=7)
    face = face_at((120.0, 120.0), 0.3, 8.0)  # its crop spans about 154 px around (120, 120)
    background = lambda image: (0.9 - 0.8 * image).clamp(0, 1)  # noqa: E731 - far from the photo everywhere
    core, far = (slice(None), slice(110, 130), slice(110, 130)), (slice(None), slice(None), slice(260, None))
    bg = background(photo)
    out, _ = restore_photo(photo, lambda x: x, detector=FixedDetector([face]), background=background)
    assert (out[far] - bg[far]).abs().max() <= 1 / 255  # the background function's output, to 8 bits
    assert (out[core] - photo[core]).abs().max() <= 1 / 255
    lo, hi = torch.minimum(photo, bg) - 1 / 255, torch.maximum(photo, bg) + 1 / 255
    assert ((out >= lo) & (out <= hi)).all()
    out2, _ = restore_photo(photo, lambda x: (x + 0.1).clamp(0, 1), detector=FixedDetector([face]),
                            background=background)
    assert (out2[core] - photo[core]).mean() > 0.08 and (out2[far] - bg[far]).abs().max() <= 1 / 255


def test_upscale_is_lanczos():
    # texture in [0.3, 0.7], so PIL's 8-bit two-pass resize never clips between its passes
    photo = io.from_pil(io.to_pil(0.3 + 0.4 * torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(2))))
    ref = io.from_pil(io.to_pil(photo).resize((90, 60), Image.LANCZOS))
    assert (resize_lanczos(photo, 3) - ref).abs().max() <= 2 / 255


def test_restore_photo_options_and_errors():
    photo = smooth_photo(200, 300)
    small, big = face_at((60.0, 60.0), 0.2, 0.0), face_at((200.0, 110.0), 0.45, 0.0)
    det = FixedDetector([small, big])
    calls = []

    def spy(x):
        calls.append(x.shape[0])
        return x

    _, rep = restore_photo(photo, spy, detector=det, min_face=2 * 130 * 0.3)
    assert len(rep["faces"]) == 1 and rep["faces"][0]["box"][0] == pytest.approx(big.box[0], abs=0.01)
    assert "min-face" in rep["skipped_faces"][0]["reason"] and calls == [1]
    _, rep = restore_photo(photo, spy, detector=det, only_center_face=True, save_faces=True)
    assert len(rep["faces"]) == 1 and rep["faces"][0]["box"][0] == pytest.approx(big.box[0], abs=0.01)
    assert rep["aligned_faces"].shape == (1, 3, 512, 512) and rep["restored_faces"].shape == (1, 3, 512, 512)
    assert set(rep["seconds"]) >= {"detect", "restore", "paste"}
    bg = torch.zeros(3, 400, 600)
    out, _ = restore_photo(photo, lambda x: x, detector=FixedDetector([]), upscale=2, background=lambda im: bg)
    assert torch.equal(out, bg)  # no faces: the background, as given
    boxed, _ = restore_photo(photo, lambda x: x, detector=det, draw_box=True)
    assert (boxed - photo).abs().amax(0).gt(0.1).sum() > 100
    with pytest.raises(ValueError, match="shape"):
        restore_photo(photo, lambda x: x[:, :, :256], detector=det)
    with pytest.raises(ValueError, match="upscale"):
        restore_photo(photo, lambda x: x, detector=det, upscale=1.5)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        restore_photo(photo[None], lambda x: x, detector=det)


def test_retinaface_backend_wiring(tmp_path, monkeypatch):
    """facexlib absent: a clear error; present (a stand-in here): local weights, rows parsed."""
    from iqpir.faces.detect import RetinaFaceDetector

    monkeypatch.setitem(sys.modules, "facexlib", None)
    with pytest.raises(ImportError, match="facexlib"):
        RetinaFaceDetector()

    class FakeRetinaFace(torch.nn.Module):
        def __init__(self, network_name="resnet50", half=False):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def detect_faces(self, bgr, conf_threshold):
            assert bgr.dtype == np.float32 and bgr.shape[2] == 3
            row = [10, 20, 110, 130, 0.99] + [float(v) for v in TEMPLATE_RETINAFACE_512.reshape(-1) / 5]
            return np.array([row], dtype=np.float32)

    pkg = types.ModuleType("facexlib")
    pkg.__path__ = []
    det_mod = types.ModuleType("facexlib.detection")
    ret_mod = types.ModuleType("facexlib.detection.retinaface")
    ret_mod.RetinaFace = FakeRetinaFace
    for name, mod in (("facexlib", pkg), ("facexlib.detection", det_mod), ("facexlib.detection.retinaface", ret_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IQPIR_FACEXLIB_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="detection_Resnet50_Final.pth"):
        RetinaFaceDetector()
    (tmp_path / "w").mkdir()
    torch.save({f"module.{k}": v for k, v in FakeRetinaFace().state_dict().items()},
               tmp_path / "w" / "detection_Resnet50_Final.pth")
    det = RetinaFaceDetector()
    faces = det.detect(torch.rand(3, 64, 80))
    assert len(faces) == 1 and faces[0].box == (10, 20, 110, 130) and faces[0].score == pytest.approx(0.99)
    np.testing.assert_allclose(faces[0].landmarks, TEMPLATE_RETINAFACE_512 / 5, atol=1e-4)
    assert det.template is TEMPLATE_RETINAFACE_512


# --------------------------------------------------------------------------------------
# with dlib (extra `faces`, installed by the dev extra) on photos that ship with packages
# --------------------------------------------------------------------------------------

needs_dlib = pytest.mark.skipif(importlib.util.find_spec("dlib") is None or importlib.util.find_spec("skimage") is None,
                                reason="needs the faces and dev extras (dlib-bin, face-recognition-models, scikit-image)")


def _photo(name: str) -> torch.Tensor:
    import skimage.data as skdata

    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            arr = np.asarray(Image.open(fh).convert("RGB"))
    else:
        arr = getattr(skdata, name)()
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 255


class CachedDetector:
    """The default detector, memoised by image content: each photo is detected once per module."""

    def __init__(self, det):
        self.det, self.cache = det, {}
        self.name, self.template, self.landmark_names = det.name, det.template, det.landmark_names

    def detect(self, image):
        key = (tuple(image.shape), hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest())
        if key not in self.cache:
            self.cache[key] = self.det.detect(image)
        return list(self.cache[key])


@pytest.fixture(scope="module")
def detector():
    from iqpir.faces import get_detector

    return CachedDetector(get_detector("hog+cnn"))


@pytest.fixture(scope="module")
def two_faces():
    return make_two_faces()


def make_two_faces() -> torch.Tensor:
    """A canvas with two copies of the astronaut's face: a small one, and a large one cut by the right edge."""
    astro = _photo("astronaut")[:, 20:240, 120:320]
    canvas = torch.ones(3, 420, 640) * torch.tensor([0.55, 0.6, 0.65])[:, None, None]

    def scaled(x, f):
        return F.interpolate(x[None], scale_factor=f, mode="bilinear", antialias=True, align_corners=False)[0]

    a = scaled(astro, 0.8).clamp(0, 1)
    canvas[:, 40 : 40 + a.shape[1], 60 : 60 + a.shape[2]] = a
    b = scaled(astro, 1.5).clamp(0, 1)
    cut = 110
    canvas[:, 60 : 60 + b.shape[1], 640 - b.shape[2] + cut :] = b[:, :, : b.shape[2] - cut]
    return canvas


@needs_dlib
@pytest.mark.parametrize("name,box", [("astronaut", (165, 70, 270, 175)), ("grace_hopper", (160, 140, 350, 330))])
def test_faces_found_in_bundled_photos(detector, name, box):
    faces = detector.detect(_photo(name))
    assert len(faces) == 1
    f = faces[0]
    assert max(abs(a - b) for a, b in zip(f.box, box)) < 25, f.box
    x0, y0, x1, y1 = f.box
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in f.landmarks)
    # dlib's order: the image-right eye (outer, inner), the image-left eye (outer, inner), the nose
    lm = f.landmarks
    assert lm[0, 0] > lm[1, 0] > lm[3, 0] > lm[2, 0] and lm[4, 1] > lm[:4, 1].max()


@needs_dlib
@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_no_faces_in_photos_without_faces(detector, name):
    photo = _photo(name)
    assert detector.detect(photo) == []
    out, rep = restore_photo(photo, lambda x: 1 - x, detector=detector, upscale=2)
    assert rep["faces"] == [] and torch.equal(out, resize_lanczos(photo, 2))


@needs_dlib
def test_realigned_landmarks_land_on_the_template(detector):
    """Re-detected in the aligned crop, the landmarks are where the alignment put them (a few
    pixels of 512: dlib's landmarks are whole pixels of the smaller photo) and near the template."""
    photo = _photo("astronaut")
    face = detector.detect(photo)[0]
    crop, to_crop = align_face(photo, face.landmarks, TEMPLATE_DLIB5_512)
    again = detector.detect(crop)
    assert len(again) == 1
    err_mapped = np.linalg.norm(again[0].landmarks - apply_affine(to_crop, face.landmarks), axis=1)
    err_template = np.linalg.norm(again[0].landmarks - TEMPLATE_DLIB5_512, axis=1)
    assert err_mapped.max() < 4 and err_mapped.mean() < 2.5, err_mapped
    assert err_template.max() < 6, err_template


@needs_dlib
def test_identity_network_returns_the_photo(detector, two_faces):
    """Detection, alignment, warp, mask and paste-back with an identity restorer: the input back."""
    for photo in (_photo("astronaut"), two_faces):
        out, rep = restore_photo(photo, lambda x: x, detector=detector)
        assert rep["faces"] and (out - photo).abs().max() <= 1 / 255
    out, rep = restore_photo(two_faces, lambda x: x, detector=detector, upscale=2)
    assert (out - resize_lanczos(two_faces, 2)).abs().max() <= 1 / 255


@needs_dlib
def test_two_faces_one_at_the_border(detector, two_faces):
    out, rep = restore_photo(two_faces, lambda x: 1 - x, detector=detector, save_faces=True)
    boxes = [f["box"] for f in rep["faces"]]
    assert len(boxes) == 2 and boxes[0][0] < 200 and boxes[1][2] > 640  # the second is cut by the edge
    diff = (out - two_faces).abs().amax(0)
    for x0, y0, x1, y1 in boxes:  # each face centre changed
        assert diff[int((y0 + y1) / 2), int((x0 + min(x1, 639)) / 2)] > 0.3
    assert diff[350:, 200:330].max() == 0  # far from both: untouched
    # the border face's crop is filled by mirroring, not black
    assert rep["aligned_faces"][1][:, 200:300, 420:].mean() > 0.3
    _, rep = restore_photo(two_faces, lambda x: x, detector=detector, min_face=140)
    assert len(rep["faces"]) == 1 and len(rep["skipped_faces"]) == 1 and rep["faces"][0]["box"][0] > 400
    _, rep = restore_photo(two_faces, lambda x: x, detector=detector, only_center_face=True)
    assert len(rep["faces"]) == 1


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_checkpoint(tmp_path_factory):
    from iqpir import checkpoint as ckpt
    from iqpir import config as C
    from iqpir.models import build_restorer

    cfg = C.load(preset="tiny", overrides=[
        *SMALL_MODEL, "train.stage=2",
    ])
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("facerun")
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": build_restorer(cfg.model).state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return run


@needs_dlib
def test_cli_restores_faces_and_writes_a_report(tmp_path, face_checkpoint, capsys):
    from iqpir.cli import main

    src = tmp_path / "in"
    src.mkdir()
    io.write_image(src / "astronaut.png", _photo("astronaut"))
    coffee = _photo("coffee")
    io.write_image(src / "coffee.png", coffee)
    # grace_hopper stored on its side with EXIF orientation 6 (display rotated 90 degrees clockwise)
    grace = io.to_pil(_photo("grace_hopper"))
    exif = Image.Exif()
    exif[0x0112] = 6
    grace.transpose(Image.Transpose.ROTATE_90).save(src / "grace.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    rc = main(["restore", str(src), "--checkpoint", str(face_checkpoint), "--out", str(out), "--faces",
               "--upscale", "2", "--save-faces", "--draw-box", "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "3 photos, 2 faces restored, 1 without faces" in err
    assert "--bg-checkpoint default restores the background" in err  # the seam a Lanczos background gives
    entries = {e["input"].rsplit("/", 1)[-1]: e for e in json.loads((out / "restore.json").read_text())}
    assert set(entries) == {"astronaut.png", "coffee.png", "grace.jpg"}
    for e in entries.values():
        assert set(e) >= {"input", "output", "faces", "seconds"} and set(e["seconds"]) >= {"detect", "restore", "paste"}
    assert len(entries["astronaut.png"]["faces"]) == 1 and entries["coffee.png"]["faces"] == []
    # the photo without faces is written unchanged, upscaled
    written = io.read_image(out / "coffee.png").rgb
    assert (written - resize_lanczos(coffee, 2)).abs().max() <= 1 / 255
    # EXIF orientation applied: upright size, the face where it is in the upright photo
    g = entries["grace.jpg"]
    assert g["size"] == [600, 512] and Image.open(out / "grace.jpg").size == (1024, 1200)
    x0, y0 = g["faces"][0]["box"][:2]
    assert abs(x0 - 160) < 25 and abs(y0 - 140) < 25
    crops = entries["astronaut.png"]["crops"][0]
    assert Image.open(crops["aligned"]).size == (512, 512) and Image.open(crops["restored"]).size == (512, 512)
    # again: outputs exist and are kept
    assert main(["restore", str(src), "--checkpoint", str(face_checkpoint), "--out", str(out), "--faces"]) == 0
    assert "3 skipped" in capsys.readouterr().err


def test_cli_face_flags_need_faces(tmp_path, face_checkpoint, capsys):
    from iqpir.cli import main

    io.write_image(tmp_path / "a.png", torch.rand(3, 16, 16))
    rc = main(["restore", str(tmp_path / "a.png"), "--checkpoint", str(face_checkpoint), "--out", str(tmp_path / "o"),
               "--min-face", "40"])
    assert rc == 2 and "--min-face applies only to whole photos with faces; add --faces" in capsys.readouterr().err
    rc = main(["restore", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--upscale", "2", "--draw-box"])
    assert rc == 2 and "--upscale, --draw-box apply only to whole photos" in capsys.readouterr().err
    rc = main(["restore", str(tmp_path / "a.png"), "--checkpoint", str(face_checkpoint), "--out", str(tmp_path / "w"),
               "--faces", "--detector", "hog", "--device", "cpu"])
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    # a small general model (32 px) on faces: one warning line saying what to use instead
    assert rc == 0 and len(warned) == 1 and "--faces with a general 32-px model" in warned[0]
    assert "packaged default model" in warned[0]
    rc = main(["restore", str(tmp_path / "a.png"), "--checkpoint", str(face_checkpoint), "--out", str(tmp_path / "o"),
               "--faces", "--detector", "nope"])
    assert rc == 2 and "hog+cnn" in capsys.readouterr().err
