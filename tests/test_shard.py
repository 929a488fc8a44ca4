"""`torchrun --nproc-per-node N -m iqpir restore|score ...` (issue 24, item 4): each process takes its
share of the inputs (a stable hash of the path), every output is written once, and the outputs
equal a single process's; `iqpir score`'s ranks write part tables that rank 0 merges into the one
table. Most tests simulate the ranks by their environment (RANK, WORLD_SIZE, without a
rendezvous); the `_torchrun` ones start real 2-process jobs (gloo on the CPU, a few seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_default_model import tiny_file

import iqpir
from iqpir import io
from iqpir.cli import main
from iqpir.devices import shard_owner
from iqpir.iqa.table import read_score_table, sidecar_path, table_parts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_ranks_restore_each_file_once_and_as_one_process_does(tmp_path, monkeypatch, capsys):
    unet, _ = tiny_file(tmp_path)
    src = tmp_path / "in"
    files = _images(src, n=8, size=(24, 32))
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
    assert sum(shares) == len(files) and min(shares) > 0, shares
    # the outputs, not the reports or the hidden log of finished ones (written in another order by two ranks)
    one = sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix != ".json" and not p.name.startswith("."))
    two = sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix != ".json" and not p.name.startswith("."))
    assert one == two and len(one) == len(files)
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in one)
    # each rank records the knobs it restored with, as the one process does
    knobs = {json.dumps(e["settings"]["knobs"]) for e in json.loads((tmp_path / "one" / "restore.json").read_text())}
    for rank in (0, 1):
        entries = json.loads((tmp_path / "two" / f"restore-{rank}.json").read_text())
        assert len(entries) == shares[rank] and {json.dumps(e["settings"]["knobs"]) for e in entries} == knobs
    for rank in (0, 1):  # a re-run skips what its rank wrote
        monkeypatch.setenv("RANK", str(rank))
        capsys.readouterr()
        assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "two"),
                     "--device", "cpu"]) == 0
        assert f"0 restored, {shares[rank]} skipped" in capsys.readouterr().err


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


# -- iqpir score, and real torchrun jobs (gloo, 2 processes on the CPU) -----------------------------------------


def _images(folder, n=6, size=(192, 200)):
    """n or more small images (the first, bigger, so that the table holds two sizes): more when
    rank 0 or 1 of 2 owns none, as the owner hashes the path, which has the test's folder in it."""
    names: list[Path] = []
    while len(names) < n or {shard_owner(p, 2) for p in names} != {0, 1}:
        i = len(names)
        h, w = (size[0] + 16, size[1]) if i == 0 else size
        io.write_image(folder / f"p{i}.png", torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)))
        names.append(folder / f"p{i}.png")
    return names


def _bad_file(folder, rank):
    """An unreadable .png that `rank` of 2 owns."""
    name = next(folder / f"bad{i}.png" for i in range(100) if shard_owner(folder / f"bad{i}.png", 2) == rank)
    name.write_bytes(b"not an image")
    return name


def _same_table(a, b):
    assert a.read_text() == b.read_text()
    assert sidecar_path(a).read_text() == sidecar_path(b).read_text()
    assert not table_parts(b) and not list(b.parent.glob(b.name + ".rank-*"))


def _torchrun(*args, cwd):
    """`torchrun --standalone --nproc-per-node 2 -m iqpir ARGS` with the iqpir under test, on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(Path(iqpir.__file__).parents[1]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "iqpir", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _score(*args):
    return main(["score", *map(str, args), "--device", "cpu", "--normalization", "minmax"])


def test_ranks_without_a_rendezvous_score_parts_that_merge_into_the_one_process_table(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    n = len(_images(src))
    assert _score(src, "--out", tmp_path / "one.csv") == 0
    two = tmp_path / "two.csv"
    for rank in (0, 1):  # rank 0 ends first: it merges its own part, the next run merges rank 1's
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert _score(src, "--out", two) == 0
    assert [p.name for p in table_parts(two)] == ["two.csv.rank-1-of-2.csv"]
    assert "not finished yet" not in capsys.readouterr().err
    assert len(read_score_table(two)) < n
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert _score(src, "--out", two) == 0  # one process: folds the part, scores nothing again
    assert f"0 scored, {n} skipped, 0 failed" in capsys.readouterr().err
    _same_table(tmp_path / "one.csv", two)  # minmax S over all the images, rows in the inputs' order


def test_a_rank_with_a_bad_file_names_it_the_other_finishes_and_a_rerun_skips(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    good = _images(src)
    bad = _bad_file(src, rank=0)
    assert _score(src, "--out", tmp_path / "one.csv") == 1
    two = tmp_path / "two.csv"
    monkeypatch.setenv("WORLD_SIZE", "2")
    codes = {}
    for rank in (1, 0):  # rank 0 last: it merges both parts
        monkeypatch.setenv("RANK", str(rank))
        capsys.readouterr()
        codes[rank] = _score(src, "--out", two)
        err = capsys.readouterr().err
        assert (f"failed: {bad}: " in err) == (rank == 0)
    assert codes == {0: 1, 1: 0}
    assert f"merged 2 parts into {two} ({len(good)} rows)" in err
    _same_table(tmp_path / "one.csv", two)

    io.write_image(bad, torch.rand(3, 192, 200, generator=torch.Generator().manual_seed(9)))  # mended
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert _score(src, "--out", tmp_path / "one.csv") == 0  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert _score(src, "--out", two) == 0
        mine = sum(shard_owner(p, 2) == rank for p in good)
        assert f"rank {rank} of 2: {int(rank == 0)} scored, {mine} skipped, 0 failed" in capsys.readouterr().err
    _same_table(tmp_path / "one.csv", two)


def test_without_a_rendezvous_rank_0_leaves_parts_that_are_not_done(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    _images(src)
    two = tmp_path / "two.csv"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _score(src, "--out", two) == 0
    done = tmp_path / "two.csv.rank-1-of-2.done"
    done.unlink()  # rank 1 still at work
    monkeypatch.setenv("RANK", "0")
    assert _score(src, "--out", two) == 0
    assert "1 part not finished yet (two.csv.rank-1-of-2.csv)" in capsys.readouterr().err
    assert [p.name for p in table_parts(two)] == ["two.csv.rank-1-of-2.csv"]


@pytest.mark.slow
def test_torchrun_restore_two_processes_write_what_one_does(tmp_path):
    unet, _ = tiny_file(tmp_path)
    src = tmp_path / "in"
    n = len(_images(src, n=6, size=(24, 32)))
    assert main(["restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    run = _torchrun("restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "two"), "--device", "cpu",
                    cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    one = sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) and len(one) == n
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in one)


@pytest.mark.slow  # a real 2-process torchrun job: seconds of process start-up
def test_torchrun_score_merges_into_the_one_process_table(tmp_path):
    src = tmp_path / "in"
    n = len(_images(src))
    assert _score(src, "--out", tmp_path / "one.csv") == 0
    run = _torchrun("score", str(src), "--out", "two.csv", "--device", "cpu", "--normalization", "minmax",
                    cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"rank 0 of 2: merged 2 parts into two.csv ({n} rows)" in run.stderr
    _same_table(tmp_path / "one.csv", tmp_path / "two.csv")


@pytest.mark.slow
def test_torchrun_a_rank_with_a_bad_file_names_it_the_other_finishes_and_a_rerun_skips(tmp_path):
    src = tmp_path / "in"
    good = _images(src)
    bad = _bad_file(src, rank=1)
    assert _score(src, "--out", tmp_path / "one.csv") == 1  # the one-process table of the same inputs
    run = _torchrun("score", str(src), "--out", "two.csv", "--device", "cpu", "--normalization", "minmax",
                    cwd=tmp_path)
    assert run.returncode != 0
    assert f"failed: {bad}: " in run.stderr and f"rank 1 of 2: 1 failed ({bad})" in run.stderr
    assert f"rank 0 of 2: merged 2 parts into two.csv ({len(good)} rows)" in run.stderr
    _same_table(tmp_path / "one.csv", tmp_path / "two.csv")

    io.write_image(bad, torch.rand(3, 192, 200, generator=torch.Generator().manual_seed(9)))  # mended
    assert _score(src, "--out", tmp_path / "one.csv") == 0
    again = _torchrun("score", str(src), "--out", "two.csv", "--device", "cpu", "--normalization", "minmax",
                      cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    mine = sum(shard_owner(p, 2) == 1 for p in good)
    assert f"rank 1 of 2: 1 scored, {mine} skipped, 0 failed" in again.stderr
    assert f"rank 0 of 2: 0 scored, {len(good) - mine} skipped, 0 failed" in again.stderr
    _same_table(tmp_path / "one.csv", tmp_path / "two.csv")  # minmax S recomputed with the mended image
    # Every rank refuses other metrics for this table: they still meet, and the job ends.
    refused = _torchrun("score", str(src), "--out", "two.csv", "--device", "cpu", "--metrics", "piqe", cwd=tmp_path)
    assert refused.returncode != 0
    assert refused.stderr.count("iqpir score: error: two.csv: the table holds metrics ['niqe', 'piqe']") == 2
    _same_table(tmp_path / "one.csv", tmp_path / "two.csv")


@pytest.mark.slow  # a real 2-process torchrun job: seconds of process start-up
def test_torchrun_restore_a_rank_with_a_bad_file_names_it_and_the_other_finishes(tmp_path):
    unet, _ = tiny_file(tmp_path)
    src = tmp_path / "in"
    good = _images(src, n=6, size=(24, 32))
    bad = _bad_file(src, rank=0)
    args = ("restore", str(src), "--checkpoint", str(unet), "--out", str(tmp_path / "out"), "--device", "cpu")
    run = _torchrun(*args, cwd=tmp_path)
    assert run.returncode != 0
    assert f"failed: {bad}: " in run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()
                  if p.suffix != ".json" and not p.name.startswith(".")) == sorted(p.name for p in good)
