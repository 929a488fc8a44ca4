"""iqpir: real-world image restoration guided by image quality priors (IQPIR).

`import iqpir` loads torch, numpy, PIL and yaml only; optional dependencies are imported
inside the functions that need them.
"""

__version__ = "0.1.0"
