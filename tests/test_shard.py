"""`torchrun --nproc-per-node N -m iqpir restore ...` (issue 24, item 4): each process restores its
share of the inputs (a stable hash of the path), every output is written once, and the outputs
equal a single process's. The ranks are simulated here by their environment (RANK, WORLD_SIZE),
as torchrun sets it; restoring needs no communication between them."""

from __future__ import annotations

import json

import pytest
import torch
from test_default_model import tiny_file

from iqpir import io
from iqpir.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_ranks_restore_each_file_once_and_as_one_process_does(tmp_path, monkeypatch, capsys):
    unet, _ = tiny_file(tmp_path)
    src = tmp_path / "in"
    for i in range(8):
        io.write_image(src / f"p{i}.png", torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(i)))
    assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        capsys.readouterr()
        assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "two"),
                     "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        shares.append(int(err.split(f"rank {rank} of 2: ")[1].split()[0]))
    assert sum(shares) == 8 and min(shares) > 0, shares
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    two = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert one == two and len(one) == 8
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in one)


def test_ranks_of_a_faces_job_write_their_own_reports(tmp_path, monkeypatch, face_photo):
    unet, _ = tiny_file(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.png").write_bytes(face_photo.read_bytes())
    names = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["restore", str(src), "--faces", "--detector", "hog", "--checkpoint", str(unet), "--out",
                     str(tmp_path / "out"), "--device", "cpu"]) == 0
        names += [e["input"] for e in json.loads((tmp_path / "out" / f"restore-{rank}.json").read_text())]
    assert sorted(names) == sorted(str(p) for p in src.iterdir())
