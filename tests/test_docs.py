"""The README as a new user reads it: its commands parse, its paths exist, its extras exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from iqpir.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[list[str]]:
    """Every `iqpir ...` command in the README's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
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
    assert ["demo", "--train", "--quick", "--out", "demo-quick"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    build_parser().parse_args(argv)  # an unknown flag or a bad value exits 2


def test_every_source_path_in_the_readme_exists():
    paths = re.findall(r"`((?:src/)?iqpir/[\w/.]*)`", README)
    assert paths
    for p in paths:
        assert p.startswith("src/"), f"{p}: the package lives under src/"
        assert (ROOT / p).exists(), p


def test_every_extra_the_readme_names_exists():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r"iqpir\[(\w+)\]", README))
    assert {"fid", "perceptual", "iqa"} <= named
    assert named <= set(extras), named - set(extras)
    assert any(d.startswith("torch-fidelity") for d in extras["fid"])
