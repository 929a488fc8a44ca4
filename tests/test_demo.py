"""The demo end to end at a smoke budget: bundled images -> scores -> both stages -> report."""

import json

import pytest

from iqpir.cli import main


def test_quick_demo_writes_report_results_and_runs(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("lq", "restored"):
        assert set(results[key]) == {"psnr", "ssim", "quality"}
        assert all(v == v for v in results[key].values())  # no NaN
    assert list(results["sweep"]) == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    page = (out / "report.html").read_text()
    assert (out / "sweep.png").is_file() and (out / "strip.png").is_file() and "sweep.png" in page
    assert "beat the degraded inputs" in page  # the verdict, whichever way it goes
    # the stage-2 run folder restores on its own
    restored = tmp_path / "restored"
    assert main(["restore", str(out / "data" / "heldout" / "degraded"), "--checkpoint", str(out / "stage2"),
                 "--out", str(restored), "--device", "cpu"]) == 0
    assert sorted(p.name for p in restored.iterdir()) == ["astronaut.png", "coffee.png", "grace_hopper.png"]
    with pytest.raises(FileExistsError):
        from iqpir.demo import run_demo

        run_demo(out, quick=True)
