"""Faces across video frames (issue 22): the one-euro filter and the tracking detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iqpir.faces.detect import Face
from iqpir.faces.track import OneEuro, TrackingDetector


def test_one_euro_holds_a_still_value_and_calms_jitter():
    f = OneEuro(rate=25, min_cutoff=1.0, beta=0.05)
    assert np.array_equal(f(np.array([3.0, 4.0])), [3.0, 4.0])
    assert np.allclose(f(np.array([3.0, 4.0])), [3.0, 4.0])
    rng = np.random.default_rng(0)
    noisy = 100 + rng.normal(0, 1.0, 200)
    g = OneEuro(rate=25)
    out = np.array([g(np.array([x]))[0] for x in noisy])
    assert out[20:].std() < 0.5 * noisy[20:].std()  # a still face's landmarks stop jittering
    h = OneEuro(rate=25, beta=0.5)
    ramp = [h(np.array([5.0 * t]))[0] for t in range(60)]  # a moving one follows without falling behind
    assert abs(ramp[-1] - 5.0 * 59) < 5.0


def face(x: float, y: float = 0.0, score: float = 1.0) -> Face:
    return Face((x, y, x + 50, y + 50), np.array([[x + 10, y + 10]] * 5, dtype=float), score)


class Scripted:
    """A detector that returns a scripted list of faces per call."""

    name, landmark_names = "scripted", ("a",) * 5
    template = np.zeros((5, 2))

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def detect(self, image):
        self.calls += 1
        return self.script.pop(0)


def test_detection_on_a_stride_and_held_between():
    det = Scripted([[face(0)], [face(3)], [face(6)]])
    t = TrackingDetector(det, stride=3, smooth=False)
    image = torch.zeros(3, 8, 8)
    got = [t.detect(image)[0].box[0] for _ in range(7)]
    assert det.calls == 3 and got == [0, 0, 0, 3, 3, 3, 6]


def test_a_missed_face_is_held_then_dropped_and_identities_follow_overlap():
    det = Scripted([[face(0), face(200)], [face(201), face(1)], [face(202)], [], [], [face(203)]])
    t = TrackingDetector(det, smooth=False, max_misses=2)
    image = torch.zeros(3, 8, 8)
    first = t.detect(image)
    second = t.detect(image)  # the detector's order swapped: the tracks keep their faces
    assert [f.box[0] for f in first] == [0, 200] and [f.box[0] for f in second] == [1, 201]
    assert sorted(f.box[0] for f in t.detect(image)) == [1, 202]  # the left face missed once: held
    assert sorted(f.box[0] for f in t.detect(image)) == [1, 202]  # missed twice: held
    assert [f.box[0] for f in t.detect(image)] == [202]  # the third miss: the left one ends
    assert [f.box[0] for f in t.detect(image)] == [203]


def test_stride_must_be_positive():
    with pytest.raises(ValueError, match="stride"):
        TrackingDetector(Scripted([]), stride=0)


def test_the_tracker_smooths_landmarks_unless_told_not_to():
    rng = np.random.default_rng(1)
    xs = 100 + rng.integers(-2, 3, 60).astype(float)  # dlib's landmarks: whole pixels, jittering
    for smooth, calmer in ((True, True), (False, False)):
        t = TrackingDetector(Scripted([[face(x)] for x in xs]), smooth=smooth)
        got = np.array([t.detect(torch.zeros(3, 8, 8))[0].landmarks[0, 0] for _ in xs])
        assert (np.diff(got[10:]).std() < 0.5 * np.diff(xs[10:] + 10).std()) == calmer
