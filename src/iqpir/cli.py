"""Command line: each subcommand parses its flags and makes one library call.

    iqpir model-info --preset paper | --checkpoint FILE_OR_RUN
    iqpir convert OFFICIAL.pth --out DIR
    iqpir score IMAGES... --metrics niqe,piqe --out scores.csv
    iqpir degrade IMAGES... --out DIR --preset bfr --seed 0 [--overwrite]
    iqpir train CONFIG --data DIR --out RUN [--steps N] [--resume] [--set key=value ...]
    iqpir restore IMAGES... --out DIR [--checkpoint RUN] [--quality 1.0]   # default: the packaged model
    iqpir restore PHOTOS... --checkpoint RUN --out DIR --faces [--upscale 2] [--bg-checkpoint RUN]
    iqpir export CHECKPOINT --format onnx|openvino --out FILE
    iqpir evaluate RESTORED_DIR [--reference DIR] --out results.csv
    iqpir demo [--out DIR] [--train [--quick]]
    iqpir app [--checkpoint RUN] [--host 127.0.0.1] [--port 7860] [--allowed-host NAME] [--body-timeout S]

Library modules are imported inside the handlers so that `iqpir --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Callable

from iqpir import __version__
from iqpir.config import ConfigError


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# Flag types: a bad value is a usage error (exit 2) naming the flag, before anything runs.
DEVICE_HELP = "auto (a GPU when there is one, else the CPU; the default), cpu, cuda, cuda:N or mps"
SET_HELP = "override one config value, e.g. --set train.lr=1e-4 (repeatable; keys as in the YAML files)"


def _device(text: str) -> str:
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: choose {DEVICE_HELP}")


def _float_in(low: float, high: float) -> Callable[[str], float]:
    """A flag type: a number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside [{low:g}, {high:g}]")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def _check_device(device: str) -> None:
    """A device that does not exist here is a usage error, not a torch traceback later."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and not (mps is not None and mps.is_available()):
        raise ValueError("--device mps: MPS is not available on this machine (use --device cpu or auto)")


# --------------------------------------------------------------------------------------
# model-info
# --------------------------------------------------------------------------------------


def _add_model_info(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="a built-in preset: paper (default) or tiny")
    g.add_argument("--config", default=None, help="a YAML config file")
    g.add_argument("--checkpoint", default=None,
                   help="any model file `iqpir restore` takes (a run folder, checkpoint, converted folder, official "
                        "IQPIR/CodeFormer/VQGAN .pth, U-Net .safetensors, .onnx/.xml graph, spandrel model), or "
                        "`default` for the packaged default model")
    _add_set(p)


def _run_model_info(args: argparse.Namespace) -> int:
    from iqpir import config as C
    from iqpir.models import parameter_counts

    if args.checkpoint is None:
        cfg = C.load(args.config, args.overrides, preset=args.preset if args.config is None else None)
        print(json.dumps(parameter_counts(cfg.model), indent=2))
        return 0
    from iqpir.inference.loader import model_info

    print(json.dumps(model_info(args.checkpoint), indent=2))
    return 0


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="FILE.pth", help="released IQPIR, CodeFormer or VQGAN weights (.pth)")
    p.add_argument("--out", required=True, help="new checkpoint folder (usable by restore, evaluate, train)")


def _run_convert(args: argparse.Namespace) -> int:
    from iqpir.official import convert

    stem = convert(args.source, args.out)
    print(f"iqpir convert: {args.source} -> {stem}.safetensors (+ .json)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    p.add_argument("--metrics", default="niqe,piqe", help="comma-separated metric names (default: niqe,piqe)")
    p.add_argument("--out", required=True, help="output CSV (resumed when it exists)")
    p.add_argument("--normalization", choices=["fixed", "minmax"], default="fixed",
                   help="how raw scores become S in [0, 1]: fixed = each metric's documented range (default), "
                   "minmax = the range over the scored images (the paper's); must match an existing --out table")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images of one size scored together (default 8; memory, not speed, on a CPU)")
    p.add_argument("--upsample-small", action="store_true",
                   help="score images whose shorter side is under 192 px upsampled to 192 (bicubic), as the "
                   "stage-2 quality loss does; without it NIQE cannot score them")
    _add_device(p)
    p.add_argument("--weights-dir", default=None, help="local folder of learned-metric weights (pyiqa models)")


def _run_score(args: argparse.Namespace) -> int:
    from iqpir.devices import process_shard
    from iqpir.iqa.table import score_files

    report = score_files(
        args.inputs,
        metrics=_split_list(args.metrics),
        out=args.out,
        normalization=args.normalization,
        batch_size=args.batch_size,
        device=args.device,
        weights_dir=args.weights_dir,
        upsample_small=args.upsample_small,
        shard=process_shard(),
    )
    return 1 if report.failed else 0


# --------------------------------------------------------------------------------------
# degrade
# --------------------------------------------------------------------------------------


def _add_degrade(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    p.add_argument("--out", required=True, help="output folder, not an input folder nor inside one")
    p.add_argument("--preset", choices=["bfr", "lowlight", "underwater", "backlit"], default="bfr",
                   help="the degradation pipeline (default bfr: blur, downsampling, noise, JPEG)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (default 0); the same image and seed give the same output")
    p.add_argument("--config", default=None, help="YAML config whose data.degradation section is used")
    _add_set(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    _add_verbose(p)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="name each file of the input folders that is not an image iqpir reads (the summary counts "
                        "them by extension)")


def _done(command: str, args: argparse.Namespace, report) -> int:
    """The exit status of a file command (1 when a file failed); with --verbose the ignored
    files are named first."""
    if getattr(args, "verbose", False):
        for p in report.ignored:
            print(f"iqpir {command}: ignored: {p} (not an image iqpir reads)", file=sys.stderr)
    return 1 if report.failed else 0


def _run_degrade(args: argparse.Namespace) -> int:
    from iqpir import config as C
    from iqpir.data.degradations import degrade_files

    cfg = C.load(args.config, args.overrides)
    report = degrade_files(args.inputs, args.out, cfg.data.degradation, preset=args.preset, seed=args.seed,
                           overwrite=args.overwrite)
    return _done("degrade", args, report)


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (configs/tiny-stage1.yaml, configs/paper-stage2.yaml, ...)")
    p.add_argument("--data", required=True, help="folder of high-quality training images")
    p.add_argument("--lq-data", default=None, help="folder of real LQ images matched by name (paired tasks)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="total steps of the run, counted from its start (overrides train.steps)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--stage1", default=None, help="stage-1 run folder or checkpoint (stage 2)")
    p.add_argument("--init", default=None,
                   help="fine-tune from these weights: a checkpoint, run folder, `iqpir convert` folder or "
                        "released IQPIR/CodeFormer .pth of this stage's network")
    p.add_argument("--scores", default=None, help="score table from `iqpir score` (default: scored once here)")
    _add_device(p)
    _add_set(p)


def _run_train(args: argparse.Namespace) -> int:
    from iqpir import config as C
    from iqpir.training.loop import train

    from pathlib import Path

    if args.stage1 is not None and not (Path(args.stage1).exists() or Path(args.stage1 + ".safetensors").is_file()):
        raise FileNotFoundError(f"--stage1 {args.stage1}: no such run folder or checkpoint file")
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = C.load(args.config, overrides)
    result = train(
        cfg,
        data=args.data,
        out=args.out,
        lq_data=args.lq_data,
        resume=args.resume,
        stage1=args.stage1,
        scores=args.scores,
        device=args.device,
        init=args.init,
    )
    return 0 if result.completed else 1


# --------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------


def _add_restore(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive) or globs; video files (.mp4, .mov, .mkv, .avi, .webm; "
                        "extra video) given by name")
    p.add_argument("--checkpoint", default=None,
                   help="stage-2 run folder (its latest checkpoint), checkpoint, released IQPIR/CodeFormer .pth, "
                        "a quality-conditioned U-Net (.safetensors) or a graph from `iqpir export` (.onnx, .xml); "
                        "default: the packaged default model")
    p.add_argument("--out", required=True, help="output folder, not an input folder nor inside one")
    p.add_argument("--quality", type=_float_in(0, 1), default=None,
                   help="target quality S in [0, 1] (default 1.0, the highest; IQPIR models only)")
    p.add_argument("--alpha", type=_float_in(0, 2), default=None,
                   help="HQ+ fusion weight in [0, 2]: Zq = Zq1 + alpha * Zq2 (default: the model's, 0.8 for IQPIR; "
                        "0 drops the HQ+ codes)")
    p.add_argument("--fidelity", type=_float_in(0, 1), default=None,
                   help="CodeFormer's fidelity weight w in [0, 1] (models with CFT blocks; 0 = best quality; "
                        "default: the w the model was trained at, 0 for the official releases)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are aligned faces: restore each whole at the model's size (no tiling, no detection)")
    _add_device(p)
    p.add_argument("--batch-size", type=_positive_int, default=4, help="tiles or faces per forward pass (default 4)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "int8"], default="auto",
                   help="auto (default): bf16 convolutions where the CPU/GPU has native bf16, else float32 "
                        "(restructured, channels-last, on CPUs with AVX2), the same on every run; float32: the "
                        "exact network; float16 on GPUs only (emulated on CPUs, very slow); int8: OpenVINO int8 "
                        "convolutions, calibrated once per weights file and cached (extra int8; auto never runs it)")
    _add_engine(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_verbose(p)
    g = p.add_argument_group("the output")
    g.add_argument("--blend", type=_float_in(0, 1), default=None, metavar="W",
                   help="W * restored + (1 - W) * input, inside the faces with --faces, else everywhere "
                        "(default 1: the restoration as it is; 0: the input)")
    colour = g.add_mutually_exclusive_group()
    colour.add_argument("--grayscale", dest="colour", action="store_const", const="grey", default="auto",
                        help="grey outputs whatever the inputs (default: grey inputs, including colour files "
                             "holding a grey picture, come back grey; colour ones in colour)")
    colour.add_argument("--color", dest="colour", action="store_const", const="colour",
                        help="keep the model's colour output even for grey inputs")
    g.add_argument("--crf", type=int, default=None, choices=range(52), metavar="0-51",
                   help="videos: H.264 quality, lower is better and larger (default 18)")
    g.add_argument("--max-frames", type=_positive_int, default=None, metavar="N",
                   help="videos: refuse clips of more than N frames before any work")
    g.add_argument("--format", choices=["png", "jpg", "webp", "tiff"], default=None,
                   help="write every output in this format (png: lossless); default: each input's own, "
                        "a JPEG with the input's quantisation tables and chroma subsampling")
    g.add_argument("--strip-metadata", action="store_true",
                   help="leave the inputs' EXIF (capture date, camera, GPS) and XMP out of the outputs (default: "
                        "kept, the orientation reset; the ICC colour profile is always kept)")
    _add_restore_faces(p)


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "openvino"], default=None,
                   help="auto (default): torch for checkpoints, onnxruntime for .onnx, openvino for .xml "
                        "(graphs written by `iqpir export`)")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino"], default=None,
                   help=argparse.SUPPRESS)  # the former name of --engine, kept for one release


def _engine(args: argparse.Namespace, command: str) -> str:
    """--engine, or the deprecated --backend (with a warning line)."""
    if args.backend is not None:
        print(f"iqpir {command}: warning: --backend is now --engine (--backend goes in the next release)",
              file=sys.stderr)
        if args.engine is not None and args.engine != args.backend:
            raise ValueError("--backend (the former name of --engine) and --engine disagree: give --engine only")
    return args.engine or args.backend or "auto"


def _add_restore_faces(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("whole photos with faces (--faces)")
    g.add_argument("--faces", action="store_true",
                   help="detect faces, align each to 512x512, restore it with the face model, paste it back")
    g.add_argument("--detector", default=None, help="hog+cnn (default), hog, cnn (dlib; extra faces) or retinaface "
                   "(facexlib with local weights)")
    g.add_argument("--upscale", type=int, default=None, help="output scale, an integer (default 1)")
    g.add_argument("--only-center-face", action="store_true", help="restore only the face nearest the centre")
    g.add_argument("--min-face", type=float, default=None, metavar="PX", help="leave faces smaller than PX pixels alone")
    g.add_argument("--save-faces", action="store_true", help="also write the aligned and restored crops to OUT/faces/")
    g.add_argument("--draw-box", action="store_true", help="draw the face boxes and landmarks on the output")
    g.add_argument("--bg-checkpoint", default=None,
                   help="a general model that restores the rest of the photo through tiles ('default': the "
                        "packaged model; without it the rest is kept as is, enlarged with Lanczos at --upscale > 1)")
    g.add_argument("--bg-upsampler", default=None, metavar="FILE",
                   help="an image model spandrel loads (Real-ESRGAN, SwinIR, HAT, ... .pth or .safetensors; extra "
                        "upscale) that restores and upscales the rest of the photo to --upscale; without --faces, "
                        "the whole photo")
    g.add_argument("--detect-every", type=_positive_int, default=None, metavar="K",
                   help="videos: run the face detector every K frames and track the faces in between (default 1)")
    g.add_argument("--no-smooth", dest="smooth", action="store_false",
                   help="videos: use each frame's raw landmarks (default: smoothed over time, one-euro filter)")
    g.add_argument("--face-upsample", action="store_true",
                   help="with --bg-upsampler and --upscale > 1: upscale the restored faces with that model too "
                        "before pasting them back")
    g.add_argument("--bg-tile", type=_positive_int, default=400, metavar="PX",
                   help="tile size of --bg-upsampler in input pixels (default 400; smaller needs less memory)")


_FACE_FLAGS = {"detector": "--detector", "upscale": "--upscale", "only_center_face": "--only-center-face",
               "min_face": "--min-face", "save_faces": "--save-faces", "draw_box": "--draw-box",
               "bg_checkpoint": "--bg-checkpoint", "face_upsample": "--face-upsample",
               "detect_every": "--detect-every", "no_smooth": "--no-smooth"}
# Without --faces, --bg-upsampler restores whole photos, and these apply to it.
_UPSAMPLER_FLAGS = ("upscale",)


def _restore_settings(args: argparse.Namespace, restorer) -> dict:
    """The flags that `iqpir restore` hands to both of its modes (tiles and --faces), with the
    ready Restorer (iqpir.load) in place of the checkpoint."""
    from iqpir.inference.photos import Finish

    return dict(checkpoint=restorer, out=args.out, quality=args.quality, alpha=args.alpha, device=args.device,
                batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite, fidelity=args.fidelity,
                finish=Finish(blend=args.blend, colour=args.colour, format=args.format,
                              metadata=not args.strip_metadata),
                crf=args.crf, max_frames=args.max_frames)


def _load(args: argparse.Namespace, checkpoint, **options):
    """The ready Restorer of `iqpir restore` (iqpir.load: the one place a model file is read)."""
    from iqpir.inference import load

    return load(checkpoint, device=args.device, dtype=args.dtype, engine=_engine(args, "restore"),
                batch_size=args.batch_size, fidelity=args.fidelity, **options)


def _run_restore_faces(args: argparse.Namespace) -> int:
    from iqpir.inference.photos import restore_face_files

    report = restore_face_files(
        args.inputs,
        **_restore_settings(args, _load(args, args.checkpoint)),
        detector=args.detector or "hog+cnn",
        upscale=1 if args.upscale is None else args.upscale,
        only_center_face=args.only_center_face,
        min_face=args.min_face or 0,
        save_faces=args.save_faces,
        draw_box=args.draw_box,
        bg_checkpoint=args.bg_checkpoint,
        bg_upsampler=args.bg_upsampler,
        bg_tile=args.bg_tile,
        face_upsample=args.face_upsample,
        detect_every=args.detect_every or 1,
        smooth=args.smooth,
    )
    return _done("restore", args, report)


def _run_upsampler(args: argparse.Namespace) -> int:
    """`--bg-upsampler FILE` without --faces: the whole photo through that model, at --upscale."""
    from iqpir.inference.photos import restore_files

    if args.checkpoint is not None:
        print("iqpir restore: error: without --faces, --bg-upsampler restores the whole photo: leave --checkpoint "
              "out, or add --faces to restore the faces with it", file=sys.stderr)
        return 2
    settings = _restore_settings(args, _load(args, args.bg_upsampler, tile=args.bg_tile))
    report = restore_files(args.inputs, **settings, aligned=args.aligned, upscale=args.upscale)
    return _done("restore", args, report)


def _run_restore(args: argparse.Namespace) -> int:
    """`iqpir restore`; in a torchrun job each process restores its share (inference.photos._plan),
    then waits for the others (`_finish_together`)."""
    return _finish_together("restore", lambda: _restore(args))


def _finish_together(command: str, run: Callable[[], int]) -> int:
    """Run this process's share of a torchrun file job, then meet the job's other processes
    (`iqpir.devices.ShardMeeting`) before exiting, even after an error: torchrun stops the
    whole job when one process exits with an error, which would cut short the shares of the
    others. Rank 0 names the ranks that failed; each one has named its own files."""
    from iqpir.devices import ShardMeeting, process_shard

    rank, world = process_shard()
    if world == 1:
        return run()
    code, error = 1, None
    try:
        code = run()
    except Exception as exc:  # reported after the meeting, by main, as it would be without one
        error = exc
    meeting = ShardMeeting.join()
    if meeting is None:
        if error is not None:
            raise error
        return code
    try:
        status = f"stopped: {error}" if error is not None else "" if code == 0 else f"exit status {code}"
        statuses = meeting.gather(status)
        if rank == 0:
            for r, line in enumerate(statuses):
                if line and r != 0:
                    sys.stderr.write(f"iqpir {command}: rank {r} of {world}: {line}\n")
    finally:
        meeting.close()
    if error is not None:
        raise error
    return code


def _restore(args: argparse.Namespace) -> int:
    if args.faces and args.aligned:
        print("iqpir restore: error: --faces (photos: detect and align) and --aligned (already aligned crops) "
              "exclude each other", file=sys.stderr)
        return 2
    if args.bg_checkpoint and args.bg_upsampler:
        print("iqpir restore: error: --bg-checkpoint and --bg-upsampler both restore the background: choose one",
              file=sys.stderr)
        return 2
    if args.faces:
        return _run_restore_faces(args)
    args.no_smooth = not args.smooth
    allowed = _UPSAMPLER_FLAGS if args.bg_upsampler else ()
    used = [flag for key, flag in _FACE_FLAGS.items() if getattr(args, key) not in (None, False) and key not in allowed]
    if used:
        verb = "apply" if len(used) > 1 else "applies"
        print(f"iqpir restore: error: {', '.join(used)} {verb} only to whole photos with faces; add --faces",
              file=sys.stderr)
        return 2
    if args.bg_upsampler:
        return _run_upsampler(args)
    from iqpir.inference.photos import restore_files

    report = restore_files(
        args.inputs,
        **_restore_settings(args, _load(args, args.checkpoint)),
        aligned=args.aligned,
    )
    return _done("restore", args, report)


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", default=None,
                   help="stage-2 run folder, checkpoint, `iqpir convert` folder, released IQPIR/CodeFormer .pth or "
                        "quality-conditioned U-Net (.safetensors); default: the packaged default model")
    p.add_argument("--format", required=True, choices=["onnx", "openvino"], dest="fmt",
                   help="onnx (ONNX Runtime; extra onnx) or openvino (OpenVINO IR; extra openvino)")
    p.add_argument("--out", required=True, help="output file: .onnx (onnx) or .xml (openvino, with a .bin beside it)")
    p.add_argument("--fidelity", action="store_true",
                   help="include CodeFormer's CFT blocks and a fidelity input w (about 1/3 more compute; "
                        "without it the graph restores at w = 0)")
    p.add_argument("--int8", action="store_true",
                   help="openvino only: int8 convolutions calibrated on sample photos (or --calibration), their "
                        "fidelity to float32 measured and written into the graph (extra int8; minutes)")
    p.add_argument("--calibration", default=None, metavar="FOLDER",
                   help="with --int8: calibrate on these images (your own kind of inputs) instead of the sample photos")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _run_export(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from iqpir.export import export

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    if (args.int8 or args.calibration) and args.fmt != "openvino":
        raise ValueError("--int8 writes an OpenVINO graph: use --format openvino")
    if args.calibration and not args.int8:
        raise ValueError("--calibration calibrates an int8 graph: add --int8")
    if args.int8:
        from iqpir import quantize

        quantize.require_extra("nncf", "int8")
        with tempfile.TemporaryDirectory() as tmp:
            float_graph = export(args.checkpoint, args.fmt, Path(tmp) / "float32.xml", fidelity=args.fidelity)
            info = quantize.quantize_graph(float_graph.path, args.out, args.calibration)
        print(f"iqpir export: int8: {quantize.describe_fidelity(info.int8)}", file=sys.stderr)
    else:
        info = export(args.checkpoint, args.fmt, args.out, fidelity=args.fidelity)
    print(f"iqpir export: {args.checkpoint or 'the default model'} -> {info.path} "
          f"({args.fmt}{' int8' if args.int8 else ''}, inputs {', '.join(info.inputs)})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("restored", help="folder of restored images")
    p.add_argument("--reference", default=None, help="folder of reference images matched by file name")
    p.add_argument("--metrics", default=None, help="comma-separated (default: psnr,ssim with --reference; niqe,piqe)")
    p.add_argument("--name", default=None, help="method name for the table row (default: folder name)")
    p.add_argument("--dataset", default=None, help="dataset name for the table row")
    p.add_argument("--out", required=True, help="results CSV; one row is appended per call")
    p.add_argument("--y-channel", action="store_true", help="PSNR/SSIM on the Y channel (BT.601) instead of RGB")
    _add_device(p)


def _run_evaluate(args: argparse.Namespace) -> int:
    from iqpir.metrics import evaluate_folder

    report = evaluate_folder(
        args.restored,
        reference=args.reference,
        metrics=_split_list(args.metrics) if args.metrics else None,
        name=args.name,
        dataset=args.dataset,
        out=args.out,
        y_channel=args.y_channel,
        device=args.device,
    )
    return 1 if report.failed else 0


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the whole run (default 0)")
    p.add_argument("--train", action="store_true",
                   help="train a tiny IQPIR model on the bundled photos first (about 8 minutes: a showcase of "
                        "training, not a restorer) instead of restoring with the packaged default model")
    p.add_argument("--quick", action="store_true", help="with --train: a few steps only (a smoke run, not a result)")


def _run_demo(args: argparse.Namespace) -> int:
    from iqpir.demo import run_demo

    if args.quick and not args.train:
        raise ValueError("--quick shortens the training of --train; the default demo trains nothing")
    run_demo(args.out, seed=args.seed, quick=args.quick, train=args.train)
    return 0


# --------------------------------------------------------------------------------------
# app
# --------------------------------------------------------------------------------------


def _add_app(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="stage-2 run folder (its latest checkpoint), checkpoint or .pth; default: the packaged default model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    _add_device(p)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "int8"], default="auto",
                   help="auto (default): bf16 convolutions where the CPU/GPU has native bf16, else float32 "
                        "(restructured, channels-last, on CPUs with AVX2); float32: the exact network; int8: "
                        "OpenVINO int8 convolutions (extra int8; see `iqpir restore --help`)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait behind the one being restored; more are answered 503 (default 8)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest upload in MB (default 25)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest image, in or out (default 40)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this host name (repeatable; e.g. a reverse proxy's "
                        "name). By default the app answers only the names of --host (on loopback: "
                        "localhost, 127.0.0.1, [::1]); other Host headers get 421, which stops "
                        "DNS-rebinding pages. A POST from a page of another origin (its Origin header) "
                        "gets 403")
    p.add_argument("--body-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="seconds a client has to send a request's whole body; slower ones get 408 and "
                        "are disconnected. A request joins the restore queue only once its body is in "
                        "(default 120)")


def _run_app(args: argparse.Namespace) -> int:
    from iqpir.app import AppLimits, serve

    keep_freed_memory()  # a server restores image after image: keep the heap instead of re-faulting it
    limits = AppLimits(max_bytes=int(args.max_upload_mb * 1e6), max_pixels=int(args.max_megapixels * 1e6),
                       queue=args.queue)
    # iqpir.load (inside serve, after the port is bound) makes the int8 choice as for `iqpir restore`
    return serve(args.checkpoint, host=args.host, port=args.port, device=args.device, dtype=args.dtype, limits=limits,
                 allowed_hosts=args.allowed_host, body_timeout=args.body_timeout)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "model-info": ("kind, sizes and parameter counts of a preset, config or checkpoint, as JSON",
                   _add_model_info, _run_model_info),
    "convert": ("convert released IQPIR/CodeFormer/VQGAN weights (.pth) to an iqpir checkpoint", _add_convert,
                _run_convert),
    "score": ("score images with an NR-IQA ensemble (the quality prior)", _add_score, _run_score),
    "degrade": ("make low-quality images with a degradation pipeline", _add_degrade, _run_degrade),
    "train": ("train stage 1 or stage 2 (also under torchrun)", _add_train, _run_train),
    "restore": ("restore images at a target quality", _add_restore, _run_restore),
    "export": ("export a restorer to ONNX or OpenVINO IR", _add_export, _run_export),
    "evaluate": ("evaluate restored images; append a row to a results table", _add_evaluate, _run_evaluate),
    "demo": ("the end-to-end run on images that ship with installed packages", _add_demo, _run_demo),
    "app": ("serve a web page and HTTP API that restore uploaded photos", _add_app, _run_app),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iqpir", description="Image restoration guided by image quality priors.")
    parser.add_argument("--version", action="version", version=f"iqpir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(handler=run)
    return parser


def keep_freed_memory() -> bool:
    """glibc keeps freed memory for reuse (iqpir.devices.keep_freed_memory explains why)."""
    from iqpir.devices import keep_freed_memory as keep

    return keep()


def _warnings_as_lines(command: str):
    """Show iqpir's own warnings as one line, "iqpir CMD: warning: ...", not file:line plus source."""
    import os
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(str(filename)).startswith(package + os.sep):
            print(f"iqpir {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    return original


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C's KeyboardInterrupt is: every path that
    keeps finished work on Ctrl-C (the score table saved, outputs already in place, temporary
    files removed) does so on SIGTERM too; the exit status says which signal it was."""


class _TerminateAsInterrupt:
    """SIGTERM raises `Terminated` for the length of one command (main thread only), then the
    previous handler is put back."""

    def __init__(self):
        self.previous = None

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise Terminated()

        self.previous = signal.signal(signal.SIGTERM, handler)

    def uninstall(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    # OpenMP threads that wait sleep instead of spinning (before torch loads libgomp; an explicit
    # OMP_WAIT_POLICY wins): on a shared machine spinning threads wait out a scheduler slice
    # (docs/performance.md, "A busy machine": benchmarks/bench_busy.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if args.command in ("train", "restore", "demo", "score", "evaluate", "export"):
        keep_freed_memory()
    previous = _warnings_as_lines(args.command)
    # train stops at a step's end on its own handler; uvicorn shuts the app down on its own
    terminate = _TerminateAsInterrupt() if args.command not in ("train", "app") else None
    try:
        if terminate is not None:
            terminate.install()
        if getattr(args, "device", None) is not None:
            _check_device(args.device)
        return args.handler(args)
    except ConfigError as exc:
        print(f"iqpir {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"iqpir {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; finished work is "
              "kept, and running the same command again resumes", file=sys.stderr)
        return 143 if terminated else 130  # 128 + the signal's number, as a shell reports it
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as exc:
        print(f"iqpir {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from iqpir.io import WriteError

        if not isinstance(exc, WriteError):
            raise
        print(f"iqpir {args.command}: error: {exc}", file=sys.stderr)  # one line: the file, the free space
        return 1
    finally:
        warnings.showwarning = previous
        if terminate is not None:
            terminate.uninstall()
