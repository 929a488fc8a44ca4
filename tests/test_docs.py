"""The README (and docs/usage.md, its long form) as a new user reads them: the commands parse, the
paths and extras exist, the README fits a newcomer's sitting, and its quick start runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from iqpir.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + (ROOT / "docs" / "usage.md").read_text()


def _commands() -> list[list[str]]:
    """Every `iqpir ...` command in the README's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOCS, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            words = shlex.split(line)
            for i, w in enumerate(words):
                if w.endswith("iqpir") and (i == 0 or words[i - 1] == "-m" or "/" in w):
                    out.append(words[i + 1 :])
                    break
    return out


COMMANDS = _commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15
    assert ["restore", "photo.jpg", "--out", "restored/"] in COMMANDS  # the first example: the packaged model
    assert ["restore", "photo.jpg", "--out", "restored-s05/", "--quality", "0.5"] in COMMANDS


def test_the_readme_is_a_newcomers_page():
    """What it does, install, run, test and the main jobs on one page; the rest in docs/."""
    assert len(README.splitlines()) <= 250
    assert "make demo" in README and "make test" in README


def test_the_quick_start_runs_as_written_twice(tmp_path, monkeypatch, capsys):
    """Its commands in a fresh folder: the photo line, then both restores; run again, each restore
    skips what the first run finished (nothing is skipped the first time)."""
    import subprocess
    import sys

    from iqpir.cli import main

    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README, re.S).group(1)
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    python = [line for line in lines if line.startswith(".venv/bin/python -c ")]
    restores = [shlex.split(line)[1:] for line in lines if line.startswith(".venv/bin/iqpir restore ")]
    assert len(python) == 1 and len(restores) == 2
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, *shlex.split(python[0])[1:]], check=True)
    for attempt, want in enumerate(("1 restored, 0 skipped", "0 restored, 1 skipped")):
        for argv in restores:
            assert main([*argv, "--device", "cpu"]) == 0, (attempt, argv)
            assert want in capsys.readouterr().err, (attempt, argv)
    assert all(Path(argv[argv.index("--out") + 1], "photo.jpg").is_file() for argv in restores)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    build_parser().parse_args(argv)  # an unknown flag or a bad value exits 2


def test_every_source_path_in_the_readme_exists():
    paths = re.findall(r"`((?:src/)?iqpir/[\w/.]*)`", DOCS)
    assert paths
    for p in paths:
        assert p.startswith("src/"), f"{p}: the package lives under src/"
        assert (ROOT / p).exists(), p


def test_every_extra_the_readme_names_exists():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r"iqpir\[(\w+)\]", DOCS))
    assert {"fid", "perceptual", "iqa"} <= named
    assert named <= set(extras), named - set(extras)
    assert any(d.startswith("torch-fidelity") for d in extras["fid"])


def test_make_test_finds_or_installs_chromium_itself():
    """A fresh machine: `make test` (not only .ci/run) runs the step that finds or installs the
    browser test's Chromium, and .ci/run is `make test`."""
    makefile = (ROOT / "Makefile").read_text()
    test_rule = re.search(r"^test: (.*)$", makefile, re.M).group(1).split()
    assert "chromium" in test_rule
    assert re.search(r"^chromium:\n\t@?bash tools/ensure_chromium.sh$", makefile, re.M)
    script = (ROOT / "tools" / "ensure_chromium.sh").read_text()
    assert "apt-get install" in script and "IQPIR_CHROMIUM" in script
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_benchmarks_default_photos_are_in_the_wheels():
    """bench_paths with no arguments reads photos that scikit-image's wheel holds (no pooch download)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_paths
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    try:
        images = bench_paths.photos(None, 8)
    except pytest.skip.Exception as exc:  # scikit-image skips the test where it would download
        pytest.fail(f"a default photo of bench_paths is not in the wheel: {exc}")
    assert len(images) == len(bench_paths.HELD_OUT) and all(x.shape[-1] % 8 == 0 for x in images)
