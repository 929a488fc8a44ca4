"""The web app's HTTP API: valid, bad, oversized and concurrent requests; a load test on 127.0.0.1."""

import io
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the app's tests need the app extra: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="the app's tests need httpx: pip install -e '.[dev]'")
with warnings.catch_warnings():  # Starlette >= 1.x asks for httpx2 and still works with httpx
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.app import AppLimits, HostAllowList, bind, create_app
from iqpir.cli import main
from iqpir.models import build_restorer
from iqpir.inference.files import DescribedModel
from iqpir.inference.knobs import record, resolve_knobs


def make_tiny_checkpoint(folder: Path) -> Path:
    """A stage-2 run folder holding a random-weight restorer of the tiny preset (64x64 tiles)."""
    cfg = C.from_preset("tiny")
    cfg.train.stage = 2
    torch.manual_seed(0)
    model = build_restorer(cfg.model)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(folder, {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "arch": "restorer", "step": 0})
    return folder


def png_bytes(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def photo(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth colour image (uint8) with some texture, so restorations differ visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.35 + 0.5
    img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    if channels == 4:
        img = np.concatenate([img, np.linspace(0.2, 1, w)[None, :, None].repeat(h, 0)], axis=-1)
    return (img * 255).round().astype(np.uint8)


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def expected(restorer, array: np.ndarray, **kw) -> np.ndarray:
    """What the API must answer: the restorer's output for the same pixels, as 8-bit."""
    x = torch.from_numpy(array[..., :3].astype(np.float32) / 255).permute(2, 0, 1)
    y = restorer.restore(x, **kw)
    return y.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def post(client, data: bytes, name: str = "photo.png", **fields):
    return client.post("/api/restore", files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


class StubRestorer:
    """A duck-typed restorer: returns 1 - input, records its keyword arguments; can wait or fail."""

    image_size = 64

    def __init__(self, gate: threading.Event | None = None, fail: int = 0, **attrs):
        self.calls: list[dict] = []
        self.gate = gate
        self.fail = fail
        self.__dict__.update(attrs)

    def knobs(self, quality=None, alpha=None, fidelity=None, blend=None):
        """The library's knob rule, on what this stub says it supports."""
        described = DescribedModel(None, kind="stub", quality=getattr(self, "supports_quality", True),
                                   alpha=getattr(self, "default_alpha", None),
                                   fidelity=getattr(self, "supports_fidelity", False))
        return resolve_knobs(described, quality, alpha, fidelity, blend)

    def settings(self, *flags):
        knobs = self.knobs(*flags)
        return {name: k.value for name, k in knobs.items()} | {"adain": None, "knobs": record(knobs)}

    def restore(self, images, **kw):
        self.calls.append(kw)
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        if self.fail:
            self.fail -= 1
            raise RuntimeError("planted model failure")
        return 1 - images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("app") / "run")


@pytest.fixture(scope="module")
def restorer(checkpoint):
    return iqpir.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(restorer):
    with TestClient(create_app(restorer, name="run", face_pipeline=None)) as c:
        yield c


def stub_client(stub, **kw) -> TestClient:
    return TestClient(create_app(stub, face_pipeline=kw.pop("face_pipeline", None), **kw))


# --------------------------------------------------------------------------------------
# Valid requests
# --------------------------------------------------------------------------------------


def test_health_describes_the_model_and_the_limits(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok"
    m = h["model"]
    assert (m["kind"], m["image_size"], m["name"]) == ("iqpir", 64, "run")
    assert m["supports_quality"] and m["supports_alpha"] and not m["supports_fidelity"]
    assert m["default_alpha"] == pytest.approx(0.8) and m["parameters"] > 0
    assert h["faces"]["available"] is False and "not installed" in h["faces"]["reason"]
    assert h["limits"]["max_bytes"] == 25_000_000 and h["limits"]["max_pixels"] == 40_000_000
    assert h["queue"] == {"running": 0, "waiting": 0, "capacity": 9, "done": h["queue"]["done"]}


def test_page_is_served_and_needs_nothing_from_the_internet(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for element in ('id="file"', 'id="quality"', 'id="alpha"', 'id="fidelity"', 'id="faces"', 'id="restore"',
                    'id="before"', 'id="after"', 'id="divider"', 'id="download"', 'id="status"'):
        assert element in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something from elsewhere"
    assert "@import" not in page and "url(http" not in page
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load scripts from a CDN


def test_restore_answers_the_models_output_at_the_requested_quality(client, restorer):
    img = photo(48, 80)
    r = post(client, png_bytes(img), name="my photo.png", quality=0.3, alpha=0.5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'inline; filename="my_photo-restored.png"'
    assert float(r.headers["x-restore-seconds"]) >= 0
    out = decode(r.content)
    assert out.shape == (48, 80, 3)
    want = expected(restorer, img, quality=0.3, alpha=0.5)
    assert np.abs(out.astype(int) - want).max() <= 1
    # The fields reach the model: another quality or alpha gives another image.
    for other in ({"quality": 0.9, "alpha": 0.5}, {"quality": 0.3, "alpha": 0.0}):
        assert np.abs(decode(post(client, png_bytes(img), **other).content).astype(int) - out).max() > 10


def test_defaults_are_the_best_quality_and_the_models_alpha(client, restorer):
    img = photo(64, 64, seed=3)
    out = decode(post(client, png_bytes(img)).content)
    assert np.abs(out.astype(int) - expected(restorer, img, quality=1.0)).max() <= 1


def test_upscale_and_alpha_channel(client):
    img = photo(20, 30, channels=4)
    r = post(client, png_bytes(img), upscale=2)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (60, 40) and out.mode == "RGBA"
    a = np.asarray(out)[..., 3].astype(int)
    assert abs(a[:, 0].mean() - 51) < 6 and abs(a[:, -1].mean() - 255) < 3  # the upload's alpha ramp, resized


def test_output_has_no_exif_unless_asked(client):
    exif = Image.Exif()
    exif[0x013B] = "Ada Lovelace"  # Artist
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    jpeg = png_bytes(photo(24, 40), format="JPEG", quality=95, exif=exif.tobytes())
    r = post(client, jpeg, name="phone.jpg")
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (24, 40)  # orientation applied: displayed upright
    assert "exif" not in out.info and len(out.getexif()) == 0 and b"Lovelace" not in r.content
    kept = Image.open(io.BytesIO(post(client, jpeg, name="phone.jpg", keep_exif="true").content))
    assert kept.getexif().get(0x013B) == "Ada Lovelace"
    assert kept.getexif().get(0x0112, 1) == 1  # the pixels are upright now; no viewer may rotate them again


# --------------------------------------------------------------------------------------
# Bad requests
# --------------------------------------------------------------------------------------

GOOD = png_bytes(photo(16, 16))


@pytest.mark.parametrize("files, fields, status, words", [
    ({"image": ("e.png", b"")}, {}, 400, "empty"),
    ({"image": ("notes.txt", b"hello, this is text and not a picture")}, {}, 415, "not an image"),
    ({"image": ("cut.png", GOOD[: len(GOOD) // 2])}, {}, 400, "truncated"),
    ({"image": ("cut.jpg", png_bytes(photo(64, 64), format="JPEG")[:700])}, {}, 400, "truncated"),
    ({"photo": ("a.png", GOOD)}, {}, 400, "field 'image'"),
    ({}, {"quality": "1"}, 400, "no file in the field 'image'"),
    ({"image": ("a.png", GOOD)}, {"qualty": "1"}, 400, "unknown field"),
    ({"image": ("a.png", GOOD)}, {"quality": "1.5"}, 400, "'quality' must be in [0, 1]"),
    ({"image": ("a.png", GOOD)}, {"quality": "high"}, 400, "'quality' must be a number"),
    ({"image": ("a.png", GOOD)}, {"alpha": "nan"}, 400, "'alpha' must be in [0, 2]"),
    ({"image": ("a.png", GOOD)}, {"fidelity": "0.5"}, 400, "no fidelity control"),
    ({"image": ("a.png", GOOD)}, {"faces": "true"}, 400, "face pipeline not installed"),
    ({"image": ("a.png", GOOD)}, {"faces": "maybe"}, 400, "'faces' must be true or false"),
    ({"image": ("a.png", GOOD)}, {"upscale": "0"}, 400, "'upscale' must be an integer"),
])
def test_bad_requests_name_the_problem(client, files, fields, status, words):
    kw = {"files": files} if files else {"files": {"dummy": ("", b"")}}
    r = client.post("/api/restore", data=fields, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_not_multipart_is_415(client):
    r = client.post("/api/restore", content=GOOD, headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/api/restore", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400


def test_the_server_survives_bad_input_and_model_failures(restorer):
    stub = StubRestorer(fail=1)
    with stub_client(stub) as c:
        r = post(c, GOOD)
        assert r.status_code == 500 and "planted model failure" in r.json()["detail"]
        assert post(c, GOOD).status_code == 200
        assert c.get("/api/health").json()["queue"]["waiting"] == 0


# --------------------------------------------------------------------------------------
# Oversized uploads
# --------------------------------------------------------------------------------------


def test_uploads_over_the_default_size_limit_get_413(client):
    just_over = b"\x89PNG" + bytes(25_000_000 - 3)
    r = post(client, just_over)
    assert r.status_code == 413 and "25 MB" in r.json()["detail"]
    far_over = bytes(26_000_000)  # past the body limit: refused while it streams in
    r = post(client, far_over)
    assert r.status_code == 413 and "25 MB" in r.json()["detail"]


def test_images_over_the_pixel_limit_get_413_before_decoding():
    stub = StubRestorer()
    with stub_client(stub, limits=AppLimits(max_pixels=10_000)) as c:
        big = png_bytes(np.zeros((101, 100), np.uint8))  # 10,100 pixels in a few hundred bytes
        r = post(c, big)
        assert r.status_code == 413 and "megapixels" in r.json()["detail"]
        r = post(c, png_bytes(np.zeros((60, 60), np.uint8)), upscale=2)  # 3,600 in, 14,400 out
        assert r.status_code == 413 and "upscale 2" in r.json()["detail"]
        assert post(c, png_bytes(np.zeros((60, 60), np.uint8))).status_code == 200
    assert len(stub.calls) == 1  # the refused ones never reached the model


def test_uploads_never_touch_the_disk(monkeypatch):
    """No file is opened for writing while a 2.4 MB upload (over Starlette's 1 MB in-memory spool) is served."""
    writes: list = []
    _AUDIT["sink"] = writes
    flags_w = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    try:
        with stub_client(StubRestorer()) as c:
            data = png_bytes(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8))
            assert len(data) > 2_000_000
            r = post(c, data)
    finally:
        _AUDIT["sink"] = None
    assert r.status_code == 200
    bad = [(p, m, f) for p, m, f in writes if (isinstance(m, str) and set(m) & set("wax+"))
           or (m is None and isinstance(f, int) and f & flags_w)]
    assert not bad, f"files opened for writing while serving an upload: {bad}"


_AUDIT: dict = {"sink": None}


def _audit(event: str, args: tuple) -> None:
    sink = _AUDIT["sink"]
    if sink is not None and event == "open":
        sink.append(tuple(args[:3]))


sys.addaudithook(_audit)


# --------------------------------------------------------------------------------------
# Concurrency and the queue
# --------------------------------------------------------------------------------------


def test_six_concurrent_requests_all_complete_with_their_own_results(client, restorer):
    images = [photo(40, 56, seed=i) for i in range(6)]
    qualities = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: post(client, png_bytes(images[i]), quality=qualities[i]), range(6)))
    for img, q, r in zip(images, qualities, responses):
        assert r.status_code == 200, r.text
        assert np.abs(decode(r.content).astype(int) - expected(restorer, img, quality=q)).max() <= 1
    assert client.get("/api/health").json()["queue"]["running"] == 0


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_full_queue_answers_503_with_retry_after():
    gate = threading.Event()
    stub = StubRestorer(gate=gate)
    with stub_client(stub, limits=AppLimits(queue=1)) as c, ThreadPoolExecutor(3) as pool:
        try:
            first = pool.submit(post, c, GOOD)  # runs, held at the gate
            assert _wait_for(lambda: c.get("/api/health").json()["queue"]["running"] == 1)
            second = pool.submit(post, c, GOOD)  # waits in the queue
            assert _wait_for(lambda: c.get("/api/health").json()["queue"]["waiting"] == 1)
            third = pool.submit(post, c, GOOD)  # no room: answered at once
            r = third.result(timeout=30)
            assert r.status_code == 503 and "busy" in r.json()["detail"]
            assert int(r.headers["retry-after"]) >= 1
        finally:
            gate.set()
        assert first.result(timeout=30).status_code == 200
        assert second.result(timeout=30).status_code == 200
        assert c.get("/api/health").json()["queue"] == {"running": 0, "waiting": 0, "capacity": 2, "done": 2}


# --------------------------------------------------------------------------------------
# Under abuse: names, slow senders, oversized bodies, foreign hosts and origins
# --------------------------------------------------------------------------------------

DISPOSITION = re.compile(r'inline; filename="([A-Za-z0-9_.-]+)"'
                         r"(?:; filename\*=UTF-8''([A-Za-z0-9%_.~-]+))?")


def download_name(header: str) -> tuple[str, str]:
    """(the ASCII fallback, the name a browser saves: filename* decoded where present) of a
    well-formed Content-Disposition; fails on anything else."""
    match = DISPOSITION.fullmatch(header)
    assert match, f"malformed Content-Disposition: {header!r}"
    ascii_name, star = match.groups()
    return ascii_name, unquote(star, errors="strict") if star else ascii_name


def test_a_cyrillic_upload_downloads_under_its_own_name(client):
    r = post(client, GOOD, name="Фото.png")
    assert r.status_code == 200, r.text
    ascii_name, name = download_name(r.headers["content-disposition"])
    assert name == "Фото-restored.png"
    assert ascii_name == "image-restored.png"
    r = post(client, GOOD, name="Café au lait.jpg")
    assert download_name(r.headers["content-disposition"]) == ("Cafe_au_lait-restored.png",
                                                               "Café_au_lait-restored.png")


@pytest.mark.parametrize("name", ['a"b;c.png', "line\r\nbreak\n.png", 'x"; filename="evil.exe',
                                  "../../etc/x;y.png", 'Фото "1"; 2\n.png', "tab\there\x00.png", ";", '"'])
def test_names_with_quotes_semicolons_and_newlines_give_one_well_formed_header(client, name):
    """Each name sent as httpx and browsers send it (quotes and newlines percent-encoded) and,
    where a part header can hold it (no CR/LF), raw with backslash-escaped quotes."""
    responses = [post(client, GOOD, name=name)]
    if "\r" not in name and "\n" not in name:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        body = (b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="' + quoted.encode("utf-8")
                + b'"\r\nContent-Type: image/png\r\n\r\n' + GOOD + b"\r\n--b0undary--\r\n")
        responses.append(client.post("/api/restore", content=body,
                                     headers={"content-type": "multipart/form-data; boundary=b0undary"}))
    for r in responses:
        assert r.status_code == 200, r.text
        assert len(r.headers.get_list("content-disposition")) == 1
        _, saved = download_name(r.headers["content-disposition"])
        assert saved.endswith("-restored.png") and len(saved) > len("-restored.png")
        assert not set(saved) & set('"\\/;:%\r\n\t\x00'), saved


def test_a_foreign_host_is_refused_and_loopback_names_are_answered():
    hosts = HostAllowList.for_bind("127.0.0.1", ["photos.example:8443"])
    stub = StubRestorer()
    with TestClient(create_app(stub, face_pipeline=None, allowed_hosts=hosts), base_url="http://127.0.0.1:7860") as c:
        for host in ("127.0.0.1:7860", "localhost:7860", "LOCALHOST", "localhost.:9", "[::1]:7860", "[::1]",
                     "photos.example", "photos.example:80"):
            assert c.get("/api/health", headers={"host": host}).status_code == 200, host
        for host in ("rebind.example", "rebind.example:7860", "localhost.rebind.example", "127.0.0.1.rebind.example",
                     "evil@localhost", "", "[::1]x", "10.0.0.7"):
            r = c.get("/api/health", headers={"host": host})
            assert r.status_code == 421 and "--allowed-host" in r.json()["detail"], host
        r = c.post("/api/restore", files={"image": ("a.png", GOOD)}, headers={"host": "rebind.example:7860"})
        assert r.status_code == 421 and c.get("/").status_code == 200
        assert c.get("/", headers={"host": "rebind.example"}).status_code == 421
    assert stub.calls == []


def test_the_host_allow_list_follows_the_address_bound():
    lan = HostAllowList.for_bind("192.168.1.5", ["nas.local"])
    assert lan.allows_host("192.168.1.5:7860") and lan.allows_host("nas.local:7860")
    assert not lan.allows_host("rebind.example") and not lan.allows_host("192.168.1.6")
    named = HostAllowList.for_bind("photos.lan")
    assert named.allows_host("Photos.LAN:7860") and not named.allows_host("rebind.example")
    for wildcard in ("0.0.0.0", "::"):
        anywhere = HostAllowList.for_bind(wildcard)
        assert anywhere.allows_host("10.1.2.3:7860") and anywhere.allows_host("[fe80::1]:7860")
        assert anywhere.allows_host("localhost:7860") and not anywhere.allows_host("rebind.example:7860")
    v6 = HostAllowList.for_bind("::1")
    assert v6.allows_host("[::1]:7860") and v6.allows_host("localhost") and not v6.allows_host("rebind.example")
    with pytest.raises(ValueError, match="not a host name"):
        HostAllowList.for_bind("127.0.0.1", ["a b"])


def test_a_post_from_another_origin_is_refused_and_one_without_origin_is_served():
    hosts = HostAllowList.for_bind("127.0.0.1", ["photos.example"])
    stub = StubRestorer()
    with TestClient(create_app(stub, face_pipeline=None, allowed_hosts=hosts), base_url="http://127.0.0.1:7860") as c:
        def send(origin, host="127.0.0.1:7860"):
            headers = {"host": host} | ({"origin": origin} if origin is not None else {})
            return c.post("/api/restore", files={"image": ("a.png", GOOD)}, headers=headers)

        for origin in ("http://evil.example", "http://127.0.0.1:8888", "http://localhost:7860", "null", "file://",
                       "http://127.0.0.1:7860.evil.example"):
            r = send(origin)
            assert r.status_code == 403 and "may not post" in r.json()["detail"], origin
        assert stub.calls == []
        assert send(None).status_code == 200  # curl, scripts
        assert send("http://127.0.0.1:7860").status_code == 200  # the page this server serves
        assert send("http://localhost:7860", host="localhost:7860").status_code == 200
        assert send("https://photos.example").status_code == 200  # behind a proxy named with --allowed-host
    assert len(stub.calls) == 4


@contextmanager
def served(app):
    """The app under uvicorn on 127.0.0.1 (any free port) in a thread of this process -> its port."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: srv.started or not thread.is_alive(), 30) and srv.started, "the server did not start"
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()


def _request_head(port: int, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /api/restore HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=b0undary\r\n{framing}\r\n\r\n").encode()


def test_slow_senders_are_dropped_after_the_body_timeout_and_never_hold_a_slot():
    """Ten clients trickle their bodies a byte at a time beside one normal request. Every slot
    (queue 1: two) would be theirs if a request were admitted before its body had arrived. The
    deadline is long enough that a busy machine (a shared CI host, another test beside this one)
    still serves the normal request well inside half of it."""
    timeout = 3.0
    app = create_app(StubRestorer(), face_pipeline=None, limits=AppLimits(queue=1), body_timeout=timeout)
    with served(app) as port:
        slow, dropped, answers = [], {}, {}
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(_request_head(port, 50_000) + b"--b0undary\r\n")
            slow.append(s)
        t0 = time.monotonic()
        normal = {}

        def normal_request():
            time.sleep(0.3)  # the slow ones are inside the app by now, reading their bodies
            t = time.monotonic()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                normal["status"] = http.post("/api/restore", files={"image": ("a.png", GOOD)}).status_code
            normal["seconds"], normal["done_at"] = time.monotonic() - t, time.monotonic() - t0

        thread = threading.Thread(target=normal_request)
        thread.start()
        try:
            while len(dropped) < len(slow) and time.monotonic() - t0 < timeout + 5:
                for i, s in enumerate(slow):
                    if i in dropped:
                        continue
                    try:
                        if select.select([s], [], [], 0)[0]:
                            answers[i] = s.recv(200)
                            dropped[i] = time.monotonic() - t0
                        else:
                            s.send(b"x")
                    except OSError:
                        dropped[i] = time.monotonic() - t0
                time.sleep(0.05)
            for i in answers:  # answered, then disconnected: the rest of the body is not waited for
                slow[i].settimeout(2)
                while slow[i].recv(4096):
                    pass
        finally:
            thread.join(timeout=30)
            for s in slow:
                s.close()
    assert normal["status"] == 200, normal
    assert normal["seconds"] < timeout / 2, normal  # served at once, not after the slow ones left
    assert min(dropped.values(), default=0) > normal["done_at"], "the slow clients were gone before the test"
    assert sorted(dropped) == list(range(10)), f"slow clients still connected after {timeout + 5} s: {dropped}"
    assert all(timeout - 0.2 <= t <= timeout + 2.0 for t in dropped.values()), dropped
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers.values()), answers


def test_an_oversized_body_is_refused_while_it_streams_in():
    """413 long before the client is done: the body is neither waited for nor kept whole."""
    limit = 20_000
    with served(create_app(StubRestorer(), face_pipeline=None, limits=AppLimits(max_bytes=limit),
                           body_timeout=10)) as port:
        for length in (None, 10**12):  # chunked, then a declared length far over the limit
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                part = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
                s.sendall(_request_head(port, length) + (b"%x\r\n%s\r\n" % (len(part), part) if length is None else part))
                sent, answer, chunk = 0, b"", bytes(8192)
                while sent < 200 * limit and not answer:
                    if select.select([s], [], [], 0.005)[0]:
                        answer = s.recv(200)
                        break
                    s.sendall(b"2000\r\n" + chunk + b"\r\n" if length is None else chunk)
                    sent += len(chunk)
            finally:
                s.close()
            assert answer.startswith(b"HTTP/1.1 413"), (length, sent, answer)
            assert sent < 50 * limit, (length, sent)


# --------------------------------------------------------------------------------------
# What the model supports: fidelity (CodeFormer), faces
# --------------------------------------------------------------------------------------


def test_fidelity_reaches_models_that_have_it_and_quality_is_refused_where_absent():
    stub = StubRestorer(kind="codeformer", supports_fidelity=True, supports_quality=False, fidelity=0.5)
    with stub_client(stub) as c:
        m = c.get("/api/health").json()["model"]
        assert (m["kind"], m["supports_fidelity"], m["supports_quality"], m["supports_alpha"]) == (
            "codeformer", True, False, False)
        assert post(c, GOOD, fidelity=0.3).status_code == 200
        assert stub.calls[-1] == {"fidelity": 0.3}
        r = post(c, GOOD, quality=0.5)
        assert r.status_code == 400 and "no quality control" in r.json()["detail"]
    plain = StubRestorer()
    with stub_client(plain) as c:
        post(c, GOOD, quality=0.4)
    assert plain.calls == [{"quality": 0.4}]  # no fidelity for a model without it


def test_settings_the_restorer_refuses_are_400():
    class Refusing(StubRestorer):
        def restore(self, images, **kw):
            raise ValueError("this codeformer model has one codebook: --alpha needs a dual-codebook (IQPIR) model")

    with stub_client(Refusing(default_alpha=0.8)) as c:
        r = post(c, GOOD, alpha=0.5)
    assert r.status_code == 400 and "one codebook" in r.json()["detail"]


def test_faces_go_through_the_face_pipeline_with_the_requested_quality(restorer):
    seen = {}

    def fake_restore_photo(image, restore_faces, *, upscale=1):
        seen["shape"], seen["upscale"] = tuple(image.shape), upscale
        crop = image[:, :64, :64][None]
        out = image.clone()
        out[:, :64, :64] = restore_faces(crop)[0]
        return out, {"faces": [{"box": [0, 0, 64, 64]}]}

    img = photo(64, 96, seed=5)
    with TestClient(create_app(restorer, face_pipeline=fake_restore_photo)) as c:
        assert c.get("/api/health").json()["faces"]["available"] is True
        r = post(c, png_bytes(img), faces="true", quality=0.2)
    assert r.status_code == 200, r.text
    assert seen == {"shape": (3, 64, 96), "upscale": 1} and r.headers["x-faces"] == "1"
    out = decode(r.content).astype(int)
    assert np.abs(out[:, :64] - expected(restorer, img[:, :64], quality=0.2)).max() <= 1
    assert np.abs(out[:, 64:] - img[:, 64:]).max() <= 1  # the rest is the pipeline's (here: unchanged)


def test_the_page_restores_faces_as_the_cli_does(restorer):
    """512-px face crops reach a 64-px face model resized to its size and back, as in
    `iqpir restore --faces` (inference.photos.face_restorer_fn), not through its tiles."""
    from iqpir.inference.photos import face_restorer_fn

    seen = {}

    def fake_restore_photo(image, restore_faces, *, upscale=1):
        crop = torch.nn.functional.interpolate(image[None], size=(512, 512), mode="bilinear")
        seen["crop"], seen["out"] = crop, restore_faces(crop)
        return image, {"faces": [{"box": [0, 0, 64, 64]}]}

    img = photo(64, 64, seed=6)
    with TestClient(create_app(restorer, face_pipeline=fake_restore_photo)) as c:
        assert post(c, png_bytes(img), faces="true", quality=0.3).status_code == 200
    want = face_restorer_fn(restorer, 0.3)(seen["crop"])
    assert torch.equal(seen["out"], want)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def test_cli_listens_on_loopback_unless_told():
    from iqpir.app import _is_loopback
    from iqpir.cli import build_parser

    args = build_parser().parse_args(["app", "--checkpoint", "run"])
    assert (args.host, args.port, args.queue) == ("127.0.0.1", 7860, 8)
    assert _is_loopback(args.host) and _is_loopback("::1") and not _is_loopback("0.0.0.0")


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["app", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "iqpir app: error:" in err and "Traceback" not in err
    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert main(["app", "--checkpoint", str(tmp_path / "missing"), "--port", str(port)]) == 2
        assert "choose another --port" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["app", "--checkpoint", "x", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


def test_cli_app_flags_reach_the_server(monkeypatch, capsys):
    import iqpir.app

    served_with = {}
    monkeypatch.setattr("iqpir.cli.keep_freed_memory", lambda: False)  # malloc stays as this process has it
    monkeypatch.setattr(iqpir.app, "serve", lambda checkpoint, **kw: served_with.update(kw) or 0)
    assert main(["app", "--checkpoint", "run", "--dtype", "float32", "--allowed-host", "photos.example",
                 "--allowed-host", "nas.local:8443", "--body-timeout", "7.5"]) == 0
    assert served_with["allowed_hosts"] == ["photos.example", "nas.local:8443"]
    assert served_with["body_timeout"] == 7.5
    assert main(["app", "--checkpoint", "run", "--dtype", "float32"]) == 0
    assert served_with["allowed_hosts"] == [] and served_with["body_timeout"] == 120


def _rss_kib(pid: int, key: str = "VmRSS") -> int:
    """The process's resident memory (VmRSS), its peak so far (VmHWM) or the part of it that is
    allocated memory (RssAnon: not the pages of libraries and files), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


@contextmanager
def app_process(checkpoint: Path | None, *flags: str):
    """`iqpir app [--checkpoint C] --port 0 --device cpu FLAGS` in its own process -> (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(iqpir.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    model = [] if checkpoint is None else ["--checkpoint", str(checkpoint)]
    proc = subprocess.Popen([sys.executable, "-m", "iqpir", "app", *model, "--port", "0", "--device", "cpu", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port is bound
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"no URL from iqpir app: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield proc, f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # ~6 s of CPU: a server process of its own (importing torch) and 20 restorations
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_load_20_requests_from_4_clients_against_127_0_0_1(checkpoint, restorer):
    """`iqpir app` in its own process: all 20 succeed; its memory after them is within 10% of after the first.
    It answers its own loopback names only (a DNS-rebinding page's Host gets 421)."""
    with app_process(checkpoint) as (proc, base):
        img = photo(64, 64, seed=7)
        data = png_bytes(img)
        want = expected(restorer, img, quality=0.7)

        def one(_):
            with httpx.Client(base_url=base, timeout=120) as http:
                r = http.post("/api/restore", files={"image": ("p.png", data)}, data={"quality": "0.7"})
                return r.status_code, r.content

        first = one(0)
        rss_first = _rss_kib(proc.pid)
        with ThreadPoolExecutor(4) as pool:
            results = [first] + list(pool.map(one, range(19)))
        rss_after = _rss_kib(proc.pid)
        assert [s for s, _ in results] == [200] * 20
        for _, content in results:
            assert np.abs(decode(content).astype(int) - want).max() <= 1
        assert rss_after <= 1.10 * rss_first, f"server memory grew from {rss_first} KiB to {rss_after} KiB"
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/api/health").status_code == 200
            assert http.get("/api/health", headers={"host": "rebind.example"}).status_code == 421


@pytest.mark.slow  # ~15 s on 2 cores: a server process of its own restoring a 3-megapixel photo
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_the_app_gives_its_memory_back_after_a_request():
    """`iqpir app` (the packaged default model) keeps freed memory for speed
    (iqpir.devices.keep_freed_memory); once its queue is empty it hands back what a large photo
    took, instead of holding that peak for good: its memory is again within 300 MB of idle."""
    with app_process(None, "--dtype", "float32") as (proc, base), httpx.Client(base_url=base, timeout=600) as http:
        assert http.post("/api/restore", files={"image": ("small.png", GOOD)}).status_code == 200
        idle, idle_anon = _rss_kib(proc.pid), _rss_kib(proc.pid, "RssAnon")
        big = png_bytes(photo(1500, 2000, seed=8))
        assert http.post("/api/restore", files={"image": ("big.png", big)}).status_code == 200
        peak, after = _rss_kib(proc.pid, "VmHWM") - idle, _rss_kib(proc.pid) - idle
        # Allocated memory only: the first large photo also pages in library code it had not run yet.
        after_anon = _rss_kib(proc.pid, "RssAnon") - idle_anon
    assert peak > 300_000, f"the request took only {peak} KiB: nothing to give back, the test proves nothing"
    assert after <= 300_000, f"{after} KiB more than idle after the request (its peak: {peak} KiB)"
    assert after_anon <= 0.25 * peak, f"{after_anon} KiB of the request's {peak} KiB peak still allocated after it"
