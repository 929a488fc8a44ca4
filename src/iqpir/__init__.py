"""iqpir: real-world image restoration guided by image quality priors (IQPIR).

`import iqpir` loads torch, numpy, PIL and yaml only; optional dependencies are imported
inside the functions that need them.

    restorer = iqpir.load_restorer("runs/stage2")      # a run folder or a checkpoint
    restored = restorer.restore(image, quality=1.0)    # tensor or PIL image
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_restorer"]


def __getattr__(name: str):
    # Lazy: inference pulls in the networks, which `iqpir --help` does not need.
    if name == "load_restorer":
        from iqpir.inference import load_restorer

        return load_restorer
    raise AttributeError(f"module 'iqpir' has no attribute {name!r}")
