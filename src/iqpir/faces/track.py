"""Faces across the frames of a clip: tracks, smoothed landmarks, detection on a stride.

    detector = TrackingDetector(get_detector("hog+cnn"), stride=3, smooth=True, rate=25)
    for frame in frames:
        restored, report = restore_photo(frame, restore_faces, detector=detector)

`TrackingDetector` is a FaceDetector for the frames of one clip, in order. Every `stride`-th frame
(and whenever nothing is tracked) it runs the detector and matches the faces to its tracks by box
overlap (IoU >= `iou`, greedily by overlap); in between, each track keeps its last face. A track
whose face the detector misses keeps it for up to `max_misses` detections (a blink of the
detector does not drop the face), then ends. Each track's five landmarks go through a one-euro
filter (Casiez, Roussel and Vogel, "1 euro filter: a simple speed-based low-pass filter for noisy
input in interactive systems", CHI 2012): a low-pass whose cut-off rises with the landmarks'
speed, so a still face stops jittering and a moving one does not lag. The aligned crops then
move smoothly, which is what keeps the restored faces from flickering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from iqpir.faces.detect import Face, FaceDetector, _iou


class OneEuro:
    """The one-euro filter (Casiez et al. 2012) on arrays, sampled at `rate` Hz.

    x_hat = a(fc) x + (1 - a(fc)) x_hat_prev with a(fc) = 1 / (1 + tau / T), tau = 1 / (2 pi fc),
    T = 1 / rate, fc = min_cutoff + beta * |dx_hat| (per element), dx_hat the speed smoothed at
    d_cutoff. Units: cut-offs in Hz, beta in 1 / (pixels per second) for pixel coordinates.
    """

    def __init__(self, rate: float, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.period = 1.0 / rate
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None

    def _alpha(self, cutoff):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / self.period)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.x is None:
            self.x, self.dx = x.copy(), np.zeros_like(x)
            return x.copy()
        dx = (x - self.x) / self.period
        a_d = self._alpha(self.d_cutoff)
        self.dx = a_d * dx + (1 - a_d) * self.dx
        a = self._alpha(self.min_cutoff + self.beta * np.abs(self.dx))
        self.x = a * x + (1 - a) * self.x
        return self.x.copy()


@dataclass
class Track:
    face: Face  # the last face given out (landmarks smoothed)
    smoother: OneEuro | None
    misses: int = 0


class TrackingDetector:
    """A FaceDetector over the frames of one clip (see the module docstring)."""

    def __init__(self, detector: FaceDetector, stride: int = 1, smooth: bool = True, rate: float = 25.0,
                 iou: float = 0.3, max_misses: int = 2, min_cutoff: float = 1.0, beta: float = 0.05) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.detector = detector
        self.stride, self.smooth, self.rate = int(stride), smooth, float(rate)
        self.iou, self.max_misses = iou, max_misses
        self.min_cutoff, self.beta = min_cutoff, beta
        self.tracks: list[Track] = []
        self.frame = 0
        self.detections = 0  # how often the detector ran

    name = property(lambda self: f"{getattr(self.detector, 'name', 'detector')}+track")
    template = property(lambda self: self.detector.template)
    landmark_names = property(lambda self: self.detector.landmark_names)

    def _smoothed(self, track: Track | None, face: Face) -> Track:
        if track is None:
            smoother = OneEuro(self.rate, self.min_cutoff, self.beta) if self.smooth else None
            track = Track(face, smoother)
        landmarks = face.landmarks if track.smoother is None else track.smoother(face.landmarks)
        track.face = Face(face.box, np.asarray(landmarks, dtype=np.float64), face.score)
        track.misses = 0
        return track

    def detect(self, image: torch.Tensor) -> list[Face]:
        step = self.frame
        self.frame += 1
        if step % self.stride and self.tracks:  # between detections: each track holds its face
            return [t.face for t in self.tracks]
        found = list(self.detector.detect(image))
        self.detections += 1
        pairs = sorted(((_iou(t.face.box, f.box), i, j) for i, t in enumerate(self.tracks) for j, f in enumerate(found)),
                       reverse=True)
        match: dict[int, int] = {}  # track -> face, greedily by overlap
        for overlap, i, j in pairs:
            if overlap >= self.iou and i not in match and j not in match.values():
                match[i] = j
        kept = []
        for i, t in enumerate(self.tracks):  # tracks keep their order: a face keeps its place
            if i in match:
                kept.append(self._smoothed(t, found[match[i]]))
            elif t.misses < self.max_misses:  # the detector blinked: hold the face
                t.misses += 1
                kept.append(t)
        kept += [self._smoothed(None, f) for j, f in enumerate(found) if j not in match.values()]
        self.tracks = kept
        return [t.face for t in self.tracks]
