"""Inference, one way down (each module imports only the ones below it):

    photos.py    file loops: restore_files, restore_face_files, outputs, restore.json
    restorer.py  Restorer: knobs, tiles, batches (no file I/O); load_restorer(path)
    engines.py   how a described model runs: float32, mixed bf16, ONNX Runtime, OpenVINO
    files.py     what a path holds -> a DescribedModel (checkpoint, official .pth, graph)

    restorer = iqpir.load_restorer("runs/stage2")      # files.describe -> make_engine -> Restorer
    restored = restorer.restore(image, quality=1.0)
"""

from iqpir.inference.restorer import Restorer, load_restorer

__all__ = ["Restorer", "load_restorer"]
