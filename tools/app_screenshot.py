"""The README's picture of the web page (docs/app.png): the packaged default model restoring a photo.

    python tools/app_screenshot.py [--out docs/app.png] [--checkpoint FILE]

matplotlib's grace_hopper at the demo's held-out size (long side 384 px), degraded once (seed 0)
by the default model's evaluation pipeline (blur sigma 1-3, 2-4x down-sampling, noise <= 10/255,
JPEG 50-80), uploaded to `iqpir app` (in this process, any free port) in headless Chromium,
restored at S = 1, and the page captured with the divider in the middle. Needs the dev extra
(Playwright) and Chromium, as the browser test does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def degraded_photo(path: Path) -> None:
    import matplotlib.cbook
    import torch
    from PIL import Image

    from iqpir import io
    from iqpir.data.degradations import degrade
    from iqpir.training.default_model import EVAL_DEGRADATION, EVAL_SIDE, _resize_long, bfr_config

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        clean = io.from_pil(Image.open(fh).convert("RGB"))
    clean = _resize_long(clean, EVAL_SIDE)
    io.write_image(path, degrade(clean[None], bfr_config(**EVAL_DEGRADATION), generator=torch.Generator().manual_seed(0))[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/app.png"))
    p.add_argument("--checkpoint", default=None, help="default: the packaged default model")
    args = p.parse_args(argv)
    import uvicorn
    from playwright.sync_api import sync_playwright
    from test_app_browser import CHROMIUM_FLAGS, find_chromium

    import iqpir
    from iqpir.app import bind, create_app, find_face_pipeline

    restorer = iqpir.load(args.checkpoint, device="cpu")
    pipeline, _ = find_face_pipeline()
    app = create_app(restorer, name=Path(args.checkpoint).name if args.checkpoint else "iqpir/weights",
                     face_pipeline=pipeline)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
            photo = Path(tmp) / "grace_hopper.png"
            degraded_photo(photo)
            browser = pw.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('cpu')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#before", state="visible")
            page.click("#restore")
            page.wait_for_selector("#stage[data-restored='1']", timeout=120_000)
            page.mouse.move(0, 0)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
