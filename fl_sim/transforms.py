"""Batches from the decoded-image cache to model-ready tensors, augmentation included.

The cache holds uint8 NHWC images at the dataset's size; everything after the memmap read
happens on whole batches, on the training device. Augmentation runs on the uint8 NHWC
batch (a quarter of the float bytes), and normalising in NHWC then viewing the result as
NCHW yields a channels_last tensor with no extra copy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class BatchPreprocessor:
    """uint8 (B, H, W, 3) -> float (B, 3, S, S), normalised, channels_last, on `device`."""

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
            self.mean = torch.tensor(normalization[0], device=device)
            self.std = torch.tensor(normalization[1], device=device)

    def __call__(self, images: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """`generator` given: a random symmetry per image (training)."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if generator is not None:
            x = augment(x, generator)
        x = x.float().div_(255.0)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        x = x.permute(0, 3, 1, 2)  # an NCHW view of NHWC memory: channels_last
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of an NHWC batch, one of 8 symmetries per image.

    Dermoscopy has no canonical orientation, so these symmetries are label-preserving.
    """
    k = torch.randint(0, 8, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for sym in range(1, 8):  # one batched op per symmetry, not one per image
        mask = k == sym
        if mask.any():
            img = x[mask].flip(2) if sym & 4 else x[mask]
            out[mask] = torch.rot90(img, sym & 3, dims=(1, 2))
    return out
