"""Inference, one way down (each module imports only the ones below it):

    photos.py    file loops: restore_files, restore_face_files, outputs, restore.json
    video.py     frames in, restored frames out, the other streams copied
    loader.py    iqpir.load: describe the file once, choose the engine, build the Restorer
    restorer.py  Restorer: tiles, batches (no file I/O)
    knobs.py     the knob rule: flag > the checkpoint's trained value > the model's default
    engines.py   how a described model runs: float32, mixed bf16, ONNX Runtime, OpenVINO
    files.py     what a path holds -> a DescribedModel (checkpoint, official .pth, graph, ...)

    restorer = iqpir.load("runs/stage2")
    restored = restorer.restore(image, quality=1.0)
"""

from iqpir.inference.loader import load, load_restorer
from iqpir.inference.restorer import Restorer

__all__ = ["Restorer", "load", "load_restorer"]
