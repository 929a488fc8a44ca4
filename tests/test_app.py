"""The web app's HTTP API: valid, bad, oversized and concurrent requests; a load test on 127.0.0.1."""

import io
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
from iqpir.app import AppLimits, bind, create_app
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


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow  # ~6 s of CPU: a server process of its own (importing torch) and 20 restorations
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_load_20_requests_from_4_clients_against_127_0_0_1(checkpoint, restorer):
    """`iqpir app` in its own process: all 20 succeed; its memory after them is within 10% of after the first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(iqpir.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "iqpir", "app", "--checkpoint", str(checkpoint), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port is bound
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"no URL from iqpir app: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        base = f"http://127.0.0.1:{match.group(1)}"
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
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
