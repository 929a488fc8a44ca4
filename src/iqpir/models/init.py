"""Weight initialisation helpers shared by the model files."""

from __future__ import annotations

from torch import Tensor, nn


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """nn.init.normal_, skipped for meta tensors (which hold no values).

    torch implements normal_ on the meta device through its compiler stack, whose first
    import takes seconds; `iqpir model-info` builds the paper networks on meta to count them.
    """
    if tensor.is_meta:
        return tensor
    return nn.init.normal_(tensor, mean, std)
