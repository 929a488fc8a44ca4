"""The command line: every subcommand has help, model-info prints JSON, imports stay light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
    """One fresh interpreter for every package (a second one costs about 2 s): no optional
    dependency, and no face detector backend for iqpir.faces."""
    code = (
        "import sys, iqpir, iqpir.cli, iqpir.iqa, iqpir.iqa.table, iqpir.metrics, iqpir.data, iqpir.models, iqpir.inference.photos, iqpir.export,"
        " iqpir.faces;"
        "bad = [m for m in ('pyiqa', 'torchvision', 'cv2', 'lpips', 'scipy', 'skimage', 'matplotlib', 'torch_fidelity',"
        " 'dlib', 'facexlib') if m in sys.modules];"
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


# --------------------------------------------------------------------------------------
# What a new user hits: help for every flag, one device rule, values checked at the door
# --------------------------------------------------------------------------------------


def _subparsers():
    from iqpir.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_every_flag_has_help_and_every_device_flag_is_the_same():
    devices = {}
    for name, p in _subparsers().items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"iqpir {name} {action.option_strings[0]} has no help text"
            if action.dest == "device":
                devices[name] = (action.help, action.type, action.default)
    assert {"score", "train", "restore", "evaluate"} <= set(devices)
    assert len(set(devices.values())) == 1, devices  # one rule and one help text in every command


@pytest.mark.parametrize("command", ["score", "train", "restore", "evaluate"])
def test_an_unknown_device_is_a_usage_error_without_traceback(command, tmp_path, capsys):
    args = {
        "score": ["score", str(tmp_path), "--out", str(tmp_path / "s.csv")],
        "train": ["train", "configs/tiny-stage1.yaml", "--data", str(tmp_path), "--out", str(tmp_path / "r")],
        "restore": ["restore", str(tmp_path), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
        "evaluate": ["evaluate", str(tmp_path), "--out", str(tmp_path / "e.csv")],
    }[command]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--device", "gpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'gpu' is not a device" in err and "cuda:N" in err


def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "e.csv"), "--device", "cuda:1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--alpha", "-1"), ("--alpha", "2.5"), ("--quality", "1.5"),
                                        ("--batch-size", "0"), ("--alpha", "x")])
def test_restore_values_are_checked_before_anything_runs(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["restore", str(tmp_path), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), flag, value])
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["score", ".", "--out", "x.csv", "--batch-size", "0"],
                                  ["train", "c.yaml", "--data", ".", "--out", "r", "--steps", "0"]])
def test_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_a_mistyped_checkpoint_is_named_as_a_run_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["restore", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "runs" / "s3"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder or checkpoint" in err and ".safetensors" not in err


def test_float16_on_cpu_warns():
    from iqpir.inference import Restorer

    with pytest.warns(UserWarning, match="float16 on the CPU is very slow"):
        Restorer(torch.nn.Identity(), image_size=8, device="cpu", dtype="float16")


def test_evaluate_names_a_broken_file_once_and_exits_1(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "res").mkdir()
    (tmp_path / "ref").mkdir()
    for folder in ("res", "ref"):
        Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / folder / "a.png")
    (tmp_path / "res" / "b.png").write_bytes(b"broken")
    (tmp_path / "ref" / "b.png").write_bytes(b"broken")
    (tmp_path / "res" / "c.png").write_bytes((tmp_path / "res" / "a.png").read_bytes())
    (tmp_path / "ref" / "c.png").write_bytes(b"broken reference")
    rc = main(["evaluate", str(tmp_path / "res"), "--reference", str(tmp_path / "ref"), "--metrics", "psnr",
               "--out", str(tmp_path / "e.csv")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count(str(tmp_path / "res" / "b.png")) == 1, err
    assert f"failed: {tmp_path / 'res' / 'c.png'}: its reference {tmp_path / 'ref' / 'c.png'}" in err
    assert main(["evaluate", str(tmp_path / "res"), "--metrics", "psnr,ssim", "--out", str(tmp_path / "e.csv")]) == 2
    assert "psnr, ssim need reference images" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "res"), "--metrics", "psnr", "--out", str(tmp_path / "e.csv")]) == 2
    assert "psnr needs reference images" in capsys.readouterr().err


def test_the_cli_lets_waiting_threads_sleep_unless_told(tmp_path):
    """OMP_WAIT_POLICY=PASSIVE before torch loads (issue 24, item 5: beside a busy process the
    spinning default was 16% slower); an explicit setting wins."""
    import os
    import subprocess
    import sys

    code = ("import os\nfrom iqpir.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split()[-1] == "ACTIVE"
