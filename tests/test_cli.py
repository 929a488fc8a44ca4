"""The command line: every subcommand has help, model-info prints JSON, imports stay light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iqpir.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert command in capsys.readouterr().out


def test_model_info_prints_counts(capsys):
    assert main(["model-info", "--preset", "tiny"]) == 0
    counts = json.loads(capsys.readouterr().out)
    parts = ("encoder", "quality_embedding", "transformer", "heads", "codebook_common", "codebook_hq", "decoder")
    assert counts["total_params"] == sum(counts[p] for p in parts)


def test_model_info_reports_a_bad_key(capsys):
    assert main(["model-info", "--preset", "tiny", "--set", "model.alpah=1"]) == 2
    assert "model.alpah" in capsys.readouterr().err


def test_import_keeps_optional_dependencies_out():
    code = (
        "import sys, iqpir, iqpir.cli, iqpir.iqa, iqpir.iqa.table, iqpir.metrics, iqpir.data, iqpir.models, iqpir.restore;"
        "bad = [m for m in ('pyiqa', 'torchvision', 'cv2', 'lpips', 'scipy', 'skimage', 'matplotlib', 'torch_fidelity')"
        " if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "iqpir", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("iqpir ")


def test_allocator_setting_can_be_turned_off(monkeypatch):
    from iqpir.cli import keep_freed_memory

    monkeypatch.setenv("IQPIR_DEFAULT_MALLOC", "1")
    assert keep_freed_memory() is False
