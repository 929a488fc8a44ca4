"""Fixtures shared by several test files: a folder of training images and a short stage-1 run."""

from __future__ import annotations

import os

# OpenMP threads that wait for work sleep instead of spinning. The default (spin first) makes
# every small parallel region wait out a scheduler slice whenever another process holds one of
# the two cores: measured on a loaded 2-core machine, the default suite took 403 s with the
# default policy and 94 s with this one (a stage-1 training step: 3-5 s against 0.12 s). It must
# be set before torch (libgomp) is loaded, hence here, before the imports; an explicit
# OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from train_helpers import small_cfg, write_train_images


@pytest.fixture(scope="session", autouse=True)
def _own_int8_cache(tmp_path_factory):
    """The int8 graphs the tests make go to a folder of their own, and `auto` never finds a graph
    the developer's own restores cached (~/.cache/iqpir) for the packaged default model."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IQPIR_CACHE", str(tmp_path_factory.mktemp("iqpir-cache")))
    yield
    mp.undo()


@pytest.fixture()
def one_thread():
    """One torch thread for tests of small tensors: with 2 OpenMP threads on busy shared cores
    each small op waits at a thread barrier (PIQE of a 192x192 image: 2.2 s against 0.03 s on
    one thread; a small U-Net forward 0.55 s against 0.01 s, measured here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def face_photo(tmp_path_factory):
    """grace_hopper (matplotlib's sample photo) at 300x256: one face the HOG detector finds."""
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        img = Image.open(fh).convert("RGB").resize((300, 256), Image.LANCZOS)
    path = tmp_path_factory.mktemp("face") / "grace.png"
    img.save(path)
    return path


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    return write_train_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def stage1_run(train_images, tmp_path_factory):
    """A 4-step stage-1 run (the GAN from step 3) with its score table."""
    from iqpir.training.loop import train

    run = tmp_path_factory.mktemp("runs") / "s1"
    cfg = small_cfg(1, "train.steps=4", "train.gan_start_step=3")
    result = train(cfg, train_images, run, device="cpu", progress=False)
    assert result.completed and result.step == 4
    return run
