"""The demo end to end at a smoke budget: bundled images -> scores -> both stages -> report.

About a minute on 2 cores: marked slow (`make test-all` runs it).
"""

import json
import math

import pytest

from iqpir.cli import main


@pytest.mark.slow
def test_quick_demo_writes_report_results_and_runs(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("lq", "restored"):
        assert set(results[key]) == {"psnr", "ssim", "quality"}
        assert all(math.isfinite(v) for v in results[key].values())
    # The held-out inputs are seeded degradations of bundled photos: their scores are fixed
    # (measured: PSNR 22.197 dB, SSIM 0.6838, quality 0.2970); a change in the data shows here.
    assert results["lq"]["psnr"] == pytest.approx(22.197, abs=0.01)
    assert results["lq"]["ssim"] == pytest.approx(0.6838, abs=1e-3)
    assert results["lq"]["quality"] == pytest.approx(0.2970, abs=1e-3)
    # 20 steps per stage restore badly (measured PSNR 10.9 dB) but not blank or constant images.
    assert 8.0 < results["restored"]["psnr"] < 40.0 and 0.1 < results["restored"]["ssim"] <= 1.0
    for row in results["sweep"].values():
        assert 0.0 <= row["quality"] <= 1.0
    assert [r["name"] for r in results["per_image"]] == ["astronaut", "coffee", "grace_hopper"]
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
