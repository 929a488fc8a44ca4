"""The packaged default model: `default.safetensors` (weights + metadata) and `default.json` (model card).

Trained by our own recipe (`make default-model`, iqpir.training.default_model); used wherever
no `--checkpoint` is given. The card says what it is, what it was trained on, and what it measures.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).with_name("default.safetensors")
DEFAULT_CARD = Path(__file__).with_name("default.json")
