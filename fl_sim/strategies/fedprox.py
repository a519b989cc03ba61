"""FedProx's client-side term. Flower's FedProx strategy only sends `proximal-mu`."""

from __future__ import annotations

import torch
from torch import nn


def proximal_term(model: nn.Module, global_params: list[torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) * sum_i ||w_i - w_global_i||^2, the SQUARED L2 distance of Li et al. (2020).

    Several public examples (Flower's FedProx docstring among them) use the plain norm, whose
    gradient has constant magnitude and does not vanish near the global model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sq = sum((p - g).pow(2).sum() for p, g in zip(params, global_params, strict=True))
    return 0.5 * mu * sq
