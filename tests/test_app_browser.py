"""The page in a real browser: the OS's headless Chromium driven by Playwright's Python API.

One page load: drop a photo, choose a photo, move the Quality slider, press Restore, wait for the
result, check the shown image's pixels against the model's output, drag the divider, download.
Every wait is a locator's `expect` (retried until its timeout): `wait_for_function` evaluates its
text with `eval`, which the page's CSP refuses, so it worked only when its first check passed.
The browser must start: where it cannot, the test fails with the reason (CI installs Chromium
in .ci/run). IQPIR_APP_SCREENSHOT=FILE keeps its screenshot (with IQPIR_APP_CHECKPOINT=RUN: of a
trained model instead of the tiny random one; the README's picture is tools/app_screenshot.py's);
IQPIR_CHROMIUM names another Chromium executable.
"""

import base64
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import expected, make_tiny_checkpoint, png_bytes

import iqpir
from iqpir.app import HostAllowList, bind, create_app

# Flags for a machine without a display, a GPU or an internet connection (no background calls home).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL_HINT = "install Chromium (Debian: apt-get install chromium) or set IQPIR_CHROMIUM to its executable"


def find_chromium() -> str:
    named = os.environ.get("IQPIR_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"no Chromium found for the browser test; {INSTALL_HINT}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`iqpir app` on 127.0.0.1 (any free port) in a thread of this process, with a tiny random model,
    its Host allow-list and Origin check on (the page's own requests must pass them)."""
    import uvicorn

    checkpoint = os.environ.get("IQPIR_APP_CHECKPOINT") or make_tiny_checkpoint(
        tmp_path_factory.mktemp("browser") / "tiny-random")
    restorer = iqpir.load(checkpoint, device="cpu")
    app = create_app(restorer, name=Path(checkpoint).name, face_pipeline=None,
                     allowed_hosts=HostAllowList.for_bind("127.0.0.1"))
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the app's server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", restorer
    srv.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"the browser test needs Playwright's Python package (pip install -e '.[dev]'): {exc}")
    executable = find_chromium()
    with sync_playwright() as p:
        try:
            # Playwright gives every launch a new, empty profile folder (--user-data-dir).
            b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS, timeout=60_000)
        except Exception as exc:  # noqa: BLE001 - whatever stops the browser, the test says it
            pytest.fail(f"headless Chromium ({executable}) did not start: {str(exc).splitlines()[0]}; {INSTALL_HINT}")
        yield b
        b.close()


def shown_pixels(page, selector: str) -> np.ndarray:
    """The RGB pixels of an <img> as the page decoded them (drawn at its natural size on a canvas)."""
    data = page.evaluate("""(sel) => {
        const img = document.querySelector(sel);
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data;
        let s = ""; for (let i = 0; i < d.length; i++) s += String.fromCharCode(d[i]);
        return [c.width, c.height, btoa(s)];
    }""", selector)
    w, h, b64 = data
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)[..., :3]


def test_the_page_restores_a_photo_in_chromium(server, browser, tmp_path):
    import skimage.data
    from playwright.sync_api import expect

    base, restorer = server
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((96, 96), Image.LANCZOS))
    upload = png_bytes(photo)
    page = browser.new_page(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)

    page.goto(base + "/")
    expect(page.locator("#model")).to_contain_text("iqpir")
    expect(page.locator("#fidelity-row")).to_be_hidden()  # this model has no CFT blocks
    expect(page.locator("#faces")).to_be_disabled()
    expect(page.locator("#faces-note")).to_contain_text("not installed")
    expect(page.locator("#restore")).to_be_disabled()

    # Drag and drop onto the picture area (a drop event carrying the file, as a browser makes it).
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("stage").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", ["dropped.png", base64.b64encode(upload).decode()])
    expect(page.locator("#file-name")).to_contain_text("dropped.png")
    # The file picker, with a name in Cyrillic (the download keeps it: RFC 5987 filename*).
    page.set_input_files("#file", files=[{"name": "астронавт.png", "mimeType": "image/png", "buffer": upload}])
    expect(page.locator("#file-name")).to_contain_text("астронавт.png")
    expect(page.locator("#before")).to_be_visible()

    # Move the Quality slider from 1.00 down to 0.60 with the keyboard, as a user can.
    page.focus("#quality")
    for _ in range(8):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#quality-value")).to_have_text("0.60")
    # Before the first result a slider does nothing by itself: the page says what applies it.
    expect(page.locator("#status")).to_contain_text("Quality 0.60: press Restore")

    page.click("#restore")
    expect(page.locator("#stage")).to_have_attribute("data-restored", "1")
    expect(page.locator("#after")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Restored in")

    shown = shown_pixels(page, "#after").astype(int)
    alpha = float(page.input_value("#alpha"))  # the model's default, which the page starts from
    want = expected(restorer, photo, quality=0.6, alpha=alpha).astype(int)
    assert shown.shape == want.shape == (96, 96, 3)
    off = int(np.abs(shown - want).max())
    assert off <= 1, f"the page shows something else than the model's output (off by up to {off}/255)"
    at_default = expected(restorer, photo, quality=1.0, alpha=alpha).astype(int)
    assert np.abs(shown - at_default).mean() > 2, "the slider's quality did not reach the model"
    off = int(np.abs(shown_pixels(page, "#before").astype(int) - photo).max())
    assert off <= 1, f"the 'before' image is not the upload (off by up to {off}/255)"

    # The divider follows the pointer.
    box = page.locator("#stage").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5, steps=4)
    page.mouse.up()
    assert abs(float(page.get_attribute("#divider", "aria-valuenow")) - 25) <= 2

    # A re-restore (the slider moved after a result): Download is off until the new result is in.
    page.evaluate("""() => {
        window.downloadStates = [];
        const dl = document.getElementById("download");
        new MutationObserver((records) => records.forEach(() => window.downloadStates.push(dl.getAttribute("aria-disabled"))))
            .observe(dl, {attributes: true, attributeFilter: ["aria-disabled"]});
    }""")
    page.focus("#quality")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#stage")).to_have_attribute("data-restored", "2")
    expect(page.locator("#busy")).to_be_hidden()
    assert page.evaluate("window.downloadStates") == ["true", "false"], page.evaluate("window.downloadStates")
    shown = shown_pixels(page, "#after").astype(int)

    # Download gives the image shown.
    with page.expect_download() as dl:
        page.click("#download")
    assert dl.value.suggested_filename == "астронавт-restored.png"
    got = np.asarray(Image.open(io.BytesIO(Path(dl.value.path()).read_bytes())).convert("RGB")).astype(int)
    assert np.array_equal(got, shown)

    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    shot = Path(os.environ.get("IQPIR_APP_SCREENSHOT") or tmp_path / "app.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    outside = [u for u in requests if not u.startswith((base + "/", "blob:", "data:"))]
    assert not outside, f"the page asked for things outside the app: {outside}"
    assert not errors, f"errors in the page: {errors}"
    page.close()
