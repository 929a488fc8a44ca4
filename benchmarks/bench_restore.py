"""One speed table for restoring a 512x512 face: every backend and dtype side by side.

In one process, alternating the configurations round by round (median of --repeats), it times
torch float32 (the exact network), torch "auto" (iqpir.inference.engines' fast path: bf16 convolutions
where the CPU has native bf16, float32 ones where it has AVX2 only), the float32 fast path itself,
torch bf16 autocast (the path before the fast path), ONNX
Runtime and OpenVINO (graphs from iqpir.export; when installed) and, with --official-repo, the
official CodeFormer network in float32 on the same weights. For each: seconds per face at
batch 1 and at the best batch, faces per second, GFLOP/s and the share of this CPU's peak,
peak RSS (a fresh process per configuration: load + one face), and the share of the 256 code
tokens equal to torch float32's on the same face.

    # the machine must be idle: other processes change every number here
    python benchmarks/bench_restore.py --write docs/performance.md
    python benchmarks/bench_restore.py --checkpoint codeformer.pth --official-repo ../CodeFormer
    python benchmarks/bench_restore.py --kind iqpir --repeats 3 --batches 1,2
    python benchmarks/bench_restore.py --device cuda        # GPU: fp32 vs bf16 + compile, batch 1..64
    python benchmarks/bench_restore.py --faces              # + whole photo with two faces (iqpir.faces)
    python benchmarks/bench_restore.py --memory             # peak RSS only: API and CLI, float32 and auto
    python benchmarks/bench_restore.py --isa avx2 --repeats 3 --batches 1   # as on an AVX2-only CPU

--isa avx2 re-runs the script with oneDNN (convolutions), ATen's vectorised kernels (GroupNorm,
SiLU, copies) and MKL (matmuls) limited to AVX2 (EMULATED_ISA), and with iqpir's CPU flags
lacking AVX-512 and bf16, so `auto` chooses as it would there. The exported graphs are left out
then: ONNX Runtime and OpenVINO pick their kernels by their own rules.

Weights: --checkpoint (anything `load_restorer` reads), else the official fixtures' rule weights
(tests/assets/official, CodeFormer or IQPIR layout): speed does not depend on the values, and
the code agreement is then measured on the fixtures' face.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

import iqpir
from iqpir import devices
from iqpir.inference import engines

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets" / "official"
MARK_BEGIN, MARK_END = "<!-- bench_restore: begin -->", "<!-- bench_restore: end -->"
# --isa: the environment that limits the kernels torch runs to an older ISA. Each library reads
# its variable once, when it loads, so the script re-executes itself with them (ISA_MARK says so).
EMULATED_ISA = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                         "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
ISA_MARK = "IQPIR_BENCH_ISA"
# The paper's GPU figure (IQPIR, one 512x512 face on an H200), for the GPU table's context.
PAPER_H200_MS = 5.63


# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


def emulate_isa(isa: str) -> None:
    """In a process run under EMULATED_ISA[isa]: iqpir's view of the CPU flags loses what that
    ISA lacks (AVX-512, bf16, AMX), so `auto` and this script's peak see an AVX2-only CPU."""
    real = devices.cpu_flags()
    emulated = frozenset(f for f in real if not f.startswith(("avx512", "amx")))
    devices.cpu_flags = lambda: emulated
    devices.real_cpu_flags = real


if os.environ.get(ISA_MARK) in EMULATED_ISA:  # also in the --rss-child processes, which inherit it
    emulate_isa(os.environ[ISA_MARK])


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and "mhz" not in info:
                info["mhz"] = float(line.split(":", 1)[1])
    except OSError:
        pass
    try:
        info["mhz"] = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        pass
    flags = devices.cpu_flags()
    info["vector_bits"] = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    info["native_bf16"] = devices.cpu_has_native_bf16()
    isa_flags = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    info["isa"] = " ".join(f for f in isa_flags if f in flags) or "?"
    if os.environ.get(ISA_MARK) in EMULATED_ISA:
        real = getattr(devices, "real_cpu_flags", flags)
        env = " ".join(f"{k}={v}" for k, v in EMULATED_ISA[os.environ[ISA_MARK]].items())
        info["isa"] += (f"; emulated {os.environ[ISA_MARK].upper()}-only by {env} on a CPU with "
                        + " ".join(f for f in isa_flags if f in real))
    info["load"] = os.getloadavg()
    for module in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(module):
            info[module] = __import__(module).__version__
    return info


def peak_gflops(info: dict, fma_units: int) -> dict[str, float]:
    """Peak = cores x clock x FLOP/cycle; fp32 FLOP/cycle = lanes x 2 (FMA) x FMA units, and
    twice that for bf16 where the CPU has bf16 dot products (two products per fp32 lane)."""
    ghz = info.get("mhz", 0) / 1000
    fp32 = info["cores"] * ghz * (info["vector_bits"] / 32) * 2 * fma_units
    return {"float32": fp32, "bfloat16": fp32 * (2 if info["native_bf16"] else 1)}


# --------------------------------------------------------------------------------------
# Inputs, weights, the official network
# --------------------------------------------------------------------------------------


def face_image() -> torch.Tensor:
    """(1, 3, 512, 512) in [0, 1]: the official fixtures' face (scikit-image's astronaut)."""
    from PIL import Image

    path = ASSETS / "input.png"
    if path.is_file():
        img = Image.open(path).convert("RGB")
    else:
        import skimage.data

        img = Image.fromarray(skimage.data.astronaut())
    return torch.from_numpy(np.array(img.resize((512, 512)))).permute(2, 0, 1).float()[None] / 255


def rule_weights(kind: str, folder: Path) -> Path:
    """The fixtures' generated weights (assets/official/README.md) as a release-style .pth."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_official import rule_state_dict

    path = folder / f"{kind}.pth"
    torch.save({"params_ema": rule_state_dict(kind)}, path)
    return path


def official_codeformer(repo: Path, weights: Path) -> torch.nn.Module:
    """sczhou/CodeFormer's own network from a local checkout, with `weights` (an official .pth).

    Only its two architecture files are executed; `basicsr`'s package __init__ (which imports
    its data and training code) is replaced by stand-ins for the two names they use.
    """
    import logging

    archs = repo / "basicsr" / "archs"
    if not (archs / "codeformer_arch.py").is_file():
        raise SystemExit(f"--official-repo {repo}: no basicsr/archs/codeformer_arch.py (a sczhou/CodeFormer checkout?)")

    class Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    stubs = {"basicsr": types.ModuleType("basicsr"), "basicsr.utils": types.ModuleType("basicsr.utils"),
             "basicsr.utils.registry": types.ModuleType("basicsr.utils.registry"),
             "basicsr.archs": types.ModuleType("basicsr.archs")}
    stubs["basicsr.utils"].get_root_logger = lambda *a, **k: logging.getLogger("basicsr")
    stubs["basicsr.utils.registry"].ARCH_REGISTRY = Registry()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        modules = {}
        for name in ("vqgan_arch", "codeformer_arch"):
            spec = importlib.util.spec_from_file_location(f"basicsr.archs.{name}", archs / f"{name}.py")
            modules[name] = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = modules[name]
            spec.loader.exec_module(modules[name])
        net = modules["codeformer_arch"].CodeFormer(dim_embd=512, n_head=8, n_layers=9, codebook_size=1024,
                                                      connect_list=["32", "64", "128", "256"])
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("params_ema", state.get("params", state)), strict=True)
    return net.eval()


class OfficialEngine:
    """The official network called as its inference script calls it (input in [-1, 1], adain)."""

    name, dtype = "official", "float32"

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def describe(self) -> str:
        return "official CodeFormer float32"

    @torch.inference_mode()
    def outputs(self, tiles, quality=None, alpha=None, fidelity=0.0) -> dict:
        out, logits, _ = self.net(tiles * 2 - 1, w=fidelity, adain=True)
        return {"restored": (out + 1) / 2, "indices_common": logits.argmax(-1).reshape(-1, 16, 16)}


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------


def configurations(args, checkpoint: Path, graphs: dict[str, Path]) -> dict[str, dict]:
    """name -> how to build it: {"path", "dtype", "backend"} for load_restorer, or "official"."""
    configs = {
        "torch float32 (exact)": {"path": checkpoint, "dtype": "float32", "backend": "torch"},
        "torch auto (fast path)": {"path": checkpoint, "dtype": "auto", "backend": "torch"},
        "torch float32 fast path": {"path": checkpoint, "dtype": "float32-fast", "backend": "torch"},
    }
    if devices.cpu_has_native_bf16():  # emulated, bf16 convolutions leave oneDNN for ATen's slow fallback
        configs["torch bf16 autocast (before)"] = {"path": checkpoint, "dtype": "autocast-bf16",
                                                   "backend": "torch"}
    if "onnx" in graphs:
        configs["onnxruntime float32"] = {"path": graphs["onnx"], "dtype": "float32", "backend": "onnxruntime"}
    if "openvino" in graphs:
        configs["openvino float32"] = {"path": graphs["openvino"], "dtype": "float32", "backend": "openvino"}
        if devices.cpu_has_native_bf16():
            configs["openvino bf16"] = {"path": graphs["openvino"], "dtype": "bfloat16", "backend": "openvino"}
    if "int8" in graphs:
        configs["openvino int8 (float encoder: iqpir's int8)"] = {"path": graphs["int8"], "dtype": "int8",
                                                                 "backend": "openvino"}
        configs["openvino int8 (encoder too: below the bar)"] = {"path": graphs["int8-all"], "dtype": "int8",
                                                                "backend": "openvino"}
    if args.official_repo:
        configs["official CodeFormer float32"] = {"official": str(args.official_repo), "path": checkpoint}
    return configs


def build(spec: dict, device: str = "cpu"):
    """-> an engine (outputs(tiles, quality, alpha, fidelity) -> dict) for one configuration."""
    if "official" in spec:
        return OfficialEngine(official_codeformer(Path(spec["official"]), Path(spec["path"])))
    if spec["dtype"] == "autocast-bf16":  # the pre-runtime path: the float32 network under autocast
        restorer = iqpir.load(spec["path"], device=device, dtype="float32")
        return engines.TorchEngine(restorer.model, restorer.device, "bfloat16")
    if spec["dtype"] == "float32-fast":  # what `auto` runs on CPUs with AVX2 but no native bf16
        restorer = iqpir.load(spec["path"], device=device, dtype="float32")
        return engines.MixedEngine(restorer.model, restorer.device, "float32", own=True)
    return iqpir.load(spec["path"], device=device, dtype=spec["dtype"], engine=spec["backend"]).engine


def rss_of(spec: dict, quality: float | None, fidelity: float, entry: str = "api") -> int:
    """Peak RSS (bytes) of a fresh process that loads the configuration and restores one face.

    entry "api": `iqpir.load(path, dtype=..., engine=...).restore(face)`, as a script
    would (the official network and the autocast path: built and called once); "cli": `iqpir
    restore face.png --aligned` in-process (iqpir.cli.main); "import": torch and iqpir imported,
    nothing loaded (the floor every entry starts from). -1 when the process fails.
    """
    job = json.dumps({"spec": spec, "quality": quality, "fidelity": fidelity, "entry": entry}, default=str)
    out = subprocess.run([sys.executable, __file__, "--rss-child", job], capture_output=True, text=True,
                         env=os.environ, check=False)
    if out.returncode:
        print(f"peak RSS of {spec.get('dtype', 'official')} ({entry}) failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return -1
    return int(out.stdout.strip().splitlines()[-1])


def rss_child(job: str) -> None:
    """The fresh process of `rss_of`: do the job, print VmHWM in bytes (this process's own peak;
    ru_maxrss would carry the parent's peak through fork + exec)."""
    job = json.loads(job)
    spec, quality, fidelity, entry = job["spec"], job["quality"], job["fidelity"], job["entry"]
    if entry == "cli":
        from iqpir.cli import main as cli

        with tempfile.TemporaryDirectory(prefix="iqpir-rss-") as tmp:
            png = Path(tmp) / "face.png"
            from PIL import Image

            Image.fromarray((face_image()[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(png)
            argv = ["restore", str(png), "--checkpoint", str(spec["path"]), "--out", str(Path(tmp) / "out"),
                    "--aligned", "--device", "cpu", "--dtype", spec["dtype"], "--backend", spec["backend"]]
            argv += ["--quality", str(quality)] if quality is not None else []
            argv += ["--fidelity", str(fidelity)] if fidelity else []
            if cli(argv) != 0:
                raise SystemExit(1)
    elif entry == "api" and "official" not in spec and spec["dtype"] in engines.DTYPE_CHOICES:
        restorer = iqpir.load(spec["path"], device="cpu", dtype=spec["dtype"], engine=spec["backend"])
        restorer.restore(face_image()[0], quality=quality, fidelity=fidelity)
    elif entry != "import":
        build(spec).outputs(face_image(), quality, None, fidelity)
    hwm = [line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")]
    print(int(hwm[0]) * 1024)


def memory_table(args) -> str:
    """Peak RSS of one 512x512 face through the API and the CLI, torch float32 and auto, each in
    a fresh process; and the floor (torch and iqpir imported)."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else rule_weights(args.kind, args.tmp)
    probe = iqpir.load(checkpoint, device="cpu", dtype="float32")
    quality = 0.9 if probe.supports_quality else None
    fidelity = args.fidelity if probe.supports_fidelity else 0.0
    del probe
    floor = rss_of({}, None, 0.0, "import")
    rows = ["| configuration | load_restorer(...).restore (GB) | iqpir restore --aligned (GB) | above the floor (API, CLI) |",
            "| --- | --- | --- | --- |"]
    for dtype in ("float32", "auto"):
        spec = {"path": checkpoint, "dtype": dtype, "backend": "torch"}
        api, cli = rss_of(spec, quality, fidelity, "api"), rss_of(spec, quality, fidelity, "cli")
        rows.append(f"| torch {dtype} | {api / 1e9:.2f} | {cli / 1e9:.2f} | {(api - floor) / 1e9:.2f}, "
                    f"{(cli - floor) / 1e9:.2f} |")
        print(rows[-1], file=sys.stderr)
    return (f"Peak RSS (VmHWM) of a fresh process that loads {checkpoint.name if args.checkpoint else args.kind + '.pth'} "
            f"(official format) and restores one 512x512 face. The floor, `import torch, iqpir` and nothing else, "
            f"is {floor / 1e9:.2f} GB with this torch build; every row includes it.\n\n" + "\n".join(rows))


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def count_flops(engine, x: torch.Tensor, quality, fidelity: float) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    grads = [p.requires_grad for p in engine.model.parameters()]
    engine.model.requires_grad_(False)  # the counter's module hooks trip over parameters needing grad
    try:
        with FlopCounterMode(display=False) as counter:
            engine.outputs(x, quality, None, fidelity)
    finally:
        for p, g in zip(engine.model.parameters(), grads):
            p.requires_grad_(g)
    return counter.get_total_flops() / x.shape[0]


def agreement(out: dict, ref: dict) -> float:
    """Share of code tokens whose codes (both codebooks where there are two) equal the reference's."""
    same = out["indices_common"] == ref["indices_common"]
    if "indices_hq" in ref and "indices_hq" in out:
        same &= out["indices_hq"] == ref["indices_hq"]
    return float(same.float().mean())


def time_round_robin(engines: dict, x: torch.Tensor, quality, fidelity: float, repeats: int,
                     sync=lambda: None) -> dict[str, float]:
    """Median seconds per call of each engine on `x`, the engines alternating within each round."""
    times = {name: [] for name in engines}
    for name, engine in engines.items():  # warm-up (allocator, kernels, graph compilation)
        engine.outputs(x, quality, None, fidelity)
    for _ in range(repeats):
        for name, engine in engines.items():
            sync()
            t = time.perf_counter()
            engine.outputs(x, quality, None, fidelity)
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def cpu_table(args, info: dict) -> str:
    tmp = args.tmp
    checkpoint = Path(args.checkpoint) if args.checkpoint else rule_weights(args.kind, tmp)
    probe = iqpir.load(checkpoint, device="cpu", dtype="float32")
    quality = 0.9 if probe.supports_quality else None
    fidelity = args.fidelity if probe.supports_fidelity else 0.0
    del probe
    graphs = {}
    from iqpir import export

    for fmt, module, suffix in (("onnx", "onnxruntime", ".onnx"), ("openvino", "openvino", ".xml")):
        if importlib.util.find_spec(module) and importlib.util.find_spec("onnx") and fmt in args.backends:
            t = time.perf_counter()
            graphs[fmt] = export.export(checkpoint, fmt, tmp / f"model{suffix}", fidelity=fidelity > 0).path
            print(f"exported {fmt} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if "openvino" in graphs and "int8" in args.backends and importlib.util.find_spec("nncf"):
        from iqpir import quantize

        for name, float_encoder in (("int8", True), ("int8-all", False)):
            t = time.perf_counter()
            graphs[name] = quantize.quantize_graph(graphs["openvino"], tmp / f"model-{name}.xml",
                                                   float_encoder=float_encoder).path
            print(f"calibrated {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    configs = configurations(args, checkpoint, graphs)
    engines = {name: build(spec) for name, spec in configs.items()}
    x = face_image()
    reference = engines["torch float32 (exact)"].outputs(x, quality, None, fidelity)
    flops = count_flops(engines["torch float32 (exact)"], x, quality, fidelity)
    agree = {name: agreement(e.outputs(x, quality, None, fidelity), reference) for name, e in engines.items()}
    per_face = {name: {} for name in engines}
    for batch in args.batches:
        xb = x.expand(batch, -1, -1, -1).contiguous()
        for name, t in time_round_robin(engines, xb, quality, fidelity, args.repeats).items():
            per_face[name][batch] = t / batch
        print(f"batch {batch}: " + ", ".join(f"{n} {per_face[n][batch]:.2f} s" for n in engines), file=sys.stderr)
    del engines
    rss = {name: rss_of(spec, quality, fidelity) for name, spec in configs.items()} if args.rss else {}
    peaks = peak_gflops(info, args.fma_units)
    base = per_face.get("official CodeFormer float32", per_face["torch float32 (exact)"])[1]
    base_name = "official" if "official CodeFormer float32" in per_face else "torch float32"
    header = (f"| configuration | s/face (batch 1) | best batch: s/face | faces/s | GFLOP/s | % of peak | "
              f"vs {base_name} fp32 | peak RSS (GB) | codes = fp32 |")
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in configs:
        one = per_face[name][1]
        best_batch = min(per_face[name], key=per_face[name].get)
        best = per_face[name][best_batch]
        kind = "bfloat16" if ("bf16" in name or ("auto" in name and info["native_bf16"])) else "float32"
        gflops = flops / best / 1e9
        share = f"{100 * gflops / peaks[kind]:.0f}% ({kind})" if peaks[kind] else "?"
        share = "-" if "int8" in name else share  # mixed int8 / float: no single peak
        mem = f"{rss[name] / 1e9:.2f}" if rss.get(name, -1) > 0 else "-"
        rows.append(f"| {name} | {one:.3f} | {best:.3f} (batch {best_batch}) | {1 / best:.2f} | {gflops:.0f} | "
                    f"{share} | {one / base:.2f}x | {mem} | {100 * agree[name]:.1f}% |")
    knob = f"S = {quality}" if quality is not None else f"w = {fidelity}"
    head = (f"One 512x512 face ({args.kind if not args.checkpoint else Path(args.checkpoint).name}, {knob}), "
            f"{flops / 1e9:.0f} GFLOP per face (counted by torch.utils.flop_counter on the float32 network). "
            f"Median of {args.repeats} alternating runs per batch size ({', '.join(map(str, args.batches))}). "
            f"Peak: {peaks['float32']:.0f} GFLOP/s float32, {peaks['bfloat16']:.0f} bf16 "
            f"({info['cores']} cores x {info.get('mhz', 0) / 1000:.2f} GHz x {info['vector_bits']}-bit vectors x "
            f"{args.fma_units} FMA units; bf16 dot products count double). Codes = fp32: the share of the 256 "
            f"code tokens equal to torch float32's on the same face.")
    return head + "\n\n" + "\n".join(rows)


def gpu_table(args) -> str:
    """GPU: float32 against bf16 channels-last (+ torch.compile), images per second for batch 1..64."""
    tmp = args.tmp
    checkpoint = Path(args.checkpoint) if args.checkpoint else rule_weights(args.kind, tmp)
    device = torch.device(args.device)
    exact = iqpir.load(checkpoint, device=args.device, dtype="float32").engine
    fast = engines.MixedEngine(exact.model, device, "bfloat16")
    quality = 0.9 if exact.model.quality_embedding.kind != "none" else None
    runs = {"float32": exact, "bf16 channels-last": fast}
    if not args.no_compile:
        compiled = engines.MixedEngine(exact.model, device, "bfloat16")
        compiled.fast.encoder.inner = torch.compile(compiled.fast.encoder.inner)
        compiled.fast.decoder.inner = torch.compile(compiled.fast.decoder.inner)
        runs["bf16 channels-last + torch.compile"] = compiled
    rows = ["| batch | " + " | ".join(f"{n}: images/s" for n in runs) + " |",
            "| --- |" + " --- |" * len(runs)]
    for batch in (1, 2, 4, 8, 16, 32, 64):
        x = face_image().to(device).expand(batch, -1, -1, -1).contiguous()
        try:
            t = time_round_robin(runs, x, quality, 0.0, args.repeats, sync=torch.cuda.synchronize)
        except torch.cuda.OutOfMemoryError:
            break
        rows.append(f"| {batch} | " + " | ".join(f"{batch / t[n]:.1f}" for n in runs) + " |")
    return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; the paper gives "
            f"{PAPER_H200_MS} ms per image on an H200.\n\n" + "\n".join(rows))


def faces_table(args) -> str:
    """Whole photo with two faces: detect + align + restore + paste (iqpir.faces, issue 12)."""
    try:
        from iqpir.faces import restore_photo
    except ImportError as exc:
        return f"Face pipeline: not measured: needs iqpir.faces (the faces branch) and its extra ({exc})."
    import skimage.data

    astro = torch.from_numpy(skimage.data.astronaut().copy()).permute(2, 0, 1).float() / 255
    face = astro[:, 20:240, 120:320]
    canvas = torch.ones(3, 768, 1024) * 0.6
    canvas[:, 100:320, 80:280] = face
    big = torch.nn.functional.interpolate(face[None], scale_factor=1.6, mode="bilinear", antialias=True)[0]
    canvas[:, 300:300 + big.shape[1], 560:560 + big.shape[2]] = big.clamp(0, 1)
    tmp = args.tmp
    checkpoint = Path(args.checkpoint) if args.checkpoint else rule_weights(args.kind, tmp)
    rows = ["| dtype | faces found | s/photo | detect | align | restore | paste |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for dtype in ("float32", "auto"):
        restorer = iqpir.load(checkpoint, device="cpu", dtype=dtype)
        q = 0.9 if restorer.supports_quality else None
        def restore_faces(faces, restorer=restorer, q=q):
            return restorer.restore(faces, quality=q)

        restore_photo(canvas, restore_faces)
        t = time.perf_counter()
        _, report = restore_photo(canvas, restore_faces)
        s = report["seconds"]
        rows.append(f"| {dtype} | {len(report['faces'])} | {time.perf_counter() - t:.2f} | "
                    + " | ".join(f"{s.get(k, 0):.2f}" for k in ("detect", "align", "restore", "paste")) + " |")
    return "Whole photo (1024x768, two faces), one run after a warm-up:\n\n" + "\n".join(rows)


# Op families for --profile: the first pattern in an op's name decides (self CPU time).
OP_FAMILIES = (("convolution", ("conv",)), ("group_norm", ("group_norm",)), ("silu", ("silu",)),
               ("copies and layout", ("copy_", "clone", "contiguous", "to_copy", "empty", "cat", "stack")),
               ("add / mul", ("add", "mul")),
               ("matmul, softmax (attention, Transformer)",
                ("mm", "linear", "softmax", "layer_norm", "scaled_dot")))


def profile_table(args) -> str:
    """Where the time of one face goes in the exact network and in what `auto` runs (each after
    a warm-up): torch.profiler's self CPU time summed by op family (OP_FAMILIES)."""
    from torch.profiler import ProfilerActivity, profile

    checkpoint = Path(args.checkpoint) if args.checkpoint else rule_weights(args.kind, args.tmp)
    x, columns, names = face_image(), {}, []
    for dtype in ("float32", "auto"):
        restorer = iqpir.load(checkpoint, device="cpu", dtype=dtype)
        quality = 0.9 if restorer.supports_quality else None
        restorer.engine.outputs(x, quality, None, args.fidelity)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            restorer.engine.outputs(x, quality, None, args.fidelity)
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            family = next((f for f, keys in OP_FAMILIES if any(k in event.key for k in keys)), "other")
            totals[family] = totals.get(family, 0.0) + event.self_cpu_time_total / 1e6
        name = f"{dtype}: {restorer.engine.describe()}"
        columns[name], names = totals, [*names, name]
        del restorer
    families = sorted(columns[names[0]], key=lambda f: -columns[names[0]][f])
    families += [f for f in columns[names[1]] if f not in families]
    rows = ["| op family | " + " | ".join(f"{n} (s, share)" for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for family in families + ["all"]:
        cells = []
        for n in names:
            t = sum(columns[n].values()) if family == "all" else columns[n].get(family, 0.0)
            cells.append(f"{t:.2f} ({100 * t / sum(columns[n].values()):.0f}%)")
        rows.append(f"| {family} | " + " | ".join(cells) + " |")
    return ("Where one face's time goes: torch.profiler self CPU time by op family, one profiled run "
            "after a warm-up (the profiler's own overhead included):\n\n" + "\n".join(rows))


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text() if path.is_file() else f"# Performance\n\n{MARK_BEGIN}\n{MARK_END}\n"
    if MARK_BEGIN not in doc:
        doc += f"\n{MARK_BEGIN}\n{MARK_END}\n"
    before, rest = doc.split(MARK_BEGIN, 1)
    after = rest.split(MARK_END, 1)[1]
    path.write_text(f"{before}{MARK_BEGIN}\n{text}\n{MARK_END}{after}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="weights (default: the fixtures' rule weights)")
    ap.add_argument("--kind", choices=["codeformer", "iqpir"], default="codeformer",
                    help="layout of the rule weights when no --checkpoint is given")
    ap.add_argument("--fidelity", type=float, default=0.0, help="CodeFormer's w (CFT blocks run when > 0)")
    ap.add_argument("--official-repo", type=Path, default=None, help="a local sczhou/CodeFormer checkout")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--backends", default="onnx,openvino,int8",
                    help="exported backends to include (int8: OpenVINO int8 graphs calibrated by iqpir.quantize)")
    ap.add_argument("--isa", choices=["native", *EMULATED_ISA], default="native",
                    help="measure as on a CPU with only this ISA (emulated: see the module docstring)")
    ap.add_argument("--fma-units", type=int, default=2, help="vector FMA pipes per core, for the peak")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the per-configuration RSS runs")
    ap.add_argument("--no-compile", action="store_true", help="GPU: skip torch.compile")
    ap.add_argument("--faces", action="store_true", help="also time a whole photo with two faces")
    ap.add_argument("--memory", action="store_true",
                    help="only the peak-RSS table (API and CLI, float32 and auto, fresh processes)")
    ap.add_argument("--profile", action="store_true",
                    help="only where the time goes, float32 and auto (torch.profiler, by op family)")
    ap.add_argument("--write", type=Path, default=None, help="put the table into this Markdown file")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        return rss_child(args.rss_child)
    if (args.memory or args.profile) and args.write:
        ap.error("--memory and --profile print their table only; --write takes the whole table")
    if 1 not in args.batches:
        args.batches = [1, *args.batches]
    if args.isa != "native" and os.environ.get(ISA_MARK) != args.isa:
        env = {**os.environ, **EMULATED_ISA[args.isa], ISA_MARK: args.isa}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    if args.isa != "native":
        args.backends = ""  # their runtimes choose kernels by their own rules: not emulated
    devices.keep_freed_memory()  # as the CLI does
    with tempfile.TemporaryDirectory(prefix="iqpir-bench-") as tmp:
        args.tmp = Path(tmp)  # weights and exported graphs
        run(args)


def run(args) -> None:
    info = machine()
    command = "python benchmarks/bench_restore.py " + " ".join(sys.argv[1:])
    if args.profile:
        table, gpu_note = profile_table(args), ""
    elif args.memory:
        table, gpu_note = memory_table(args), ""
    elif args.device.startswith("cuda"):
        table = gpu_table(args)
        gpu_note = ""
    else:
        table = cpu_table(args, info)
        if args.rss:
            table += "\n\n" + memory_table(args)
        gpu_note = "\n\nGPU: not measured (no GPU was available); run the same script with `--device cuda`."
    if args.faces:
        table += "\n\n" + faces_table(args)
    libs = ", ".join(f"{m} {info[m]}" for m in ("onnxruntime", "openvino") if m in info and args.backends)
    load = " / ".join(f"{a:.2f}" for a in info["load"]) + " before, "
    load += " / ".join(f"{a:.2f}" for a in os.getloadavg())
    text = (f"Machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), {info.get('mhz', 0):.0f} MHz, "
            f"{info['threads']} torch threads; torch {info['torch']}{', ' + libs if libs else ''}, "
            f"Python {info['python']}.\nLoad average (1 / 5 / 15 min): {load} after.\n"
            f"Command: `{command}`\n\n{table}{gpu_note}")
    print(text)
    if args.write:
        write_doc(args.write, text)


if __name__ == "__main__":
    main()
