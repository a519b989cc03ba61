"""Batches from the decoded-image cache to model-ready tensors; augmentation on tensors.

The cache holds uint8 NHWC images at the dataset's size; everything after the memmap read
happens on whole batches, on the training device, so no per-image Python work remains.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class BatchPreprocessor:
    """uint8 (B, H, W, 3) -> float (B, 3, S, S), normalised, on `device`."""

    def __init__(
        self,
        input_size: int,
        normalization: tuple[tuple[float, ...], tuple[float, ...]] | None,
        device: torch.device,
    ) -> None:
        self.input_size = input_size
        self.device = device
        if normalization is None:
            self.mean, self.std = None, None
        else:
            self.mean = torch.tensor(normalization[0], device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(normalization[1], device=device).view(1, 3, 1, 1)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90-degree rotations, per image.

    Dermoscopy has no canonical orientation, so these eight symmetries are label-preserving.
    """
    k = torch.randint(0, 8, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for sym in range(1, 8):  # one batched op per symmetry, not one per image
        mask = k == sym
        if mask.any():
            img = x[mask].flip(-1) if sym & 4 else x[mask]
            out[mask] = torch.rot90(img, sym & 3, dims=(-2, -1))
    return out
