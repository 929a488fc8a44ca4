"""iqpir: real-world image restoration guided by image quality priors (IQPIR).

`import iqpir` loads torch, numpy, PIL and yaml only; optional dependencies are imported
inside the functions that need them.

    restorer = iqpir.load("runs/stage2")               # any model file; None: the packaged default model
    restored = restorer.restore(image, quality=1.0)    # tensor or PIL image
"""

__version__ = "0.2.0"

__all__ = ["Restorer", "__version__", "load", "load_restorer", "model_info"]


def __getattr__(name: str):
    # Lazy: inference pulls in the networks, which `iqpir --help` does not need.
    if name in ("load", "load_restorer", "Restorer"):
        from iqpir import inference

        return getattr(inference, name)
    if name == "model_info":
        from iqpir.inference.loader import model_info

        return model_info
    raise AttributeError(f"module 'iqpir' has no attribute {name!r}")
