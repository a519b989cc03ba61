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
        mean, std = normalization or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        std_t = torch.tensor(std, device=device)
        # (x / 255 - mean) / std as one multiply-add per value
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device) / std_t

    def __call__(self, images: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """`generator` given: a random symmetry per image (training)."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if generator is not None:
            x = augment(x, generator)
        b, h, w, c = x.shape
        # Rows of (W * 3) values against the per-channel constants tiled W times: a broadcast
        # over a last dimension of 3 is ~5x slower on CPU.
        rows = x.view(b * h, w * c).float()
        rows.mul_(self.scale.repeat(w)).add_(self.shift.repeat(w))
        x = rows.view(b, h, w, c).permute(0, 3, 1, 2)  # an NCHW view of NHWC memory: channels_last
        if h != self.input_size or w != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of an NHWC batch, one of 8 symmetries per image.

    Dermoscopy has no canonical orientation, so these symmetries are label-preserving.
    Per image, torch's flip / rot90 and one copy into the batch: ~4x faster on CPU than
    gathering the images of each symmetry with boolean masks. The four transposing
    symmetries dominate (a transposed uint8 HWC copy); composing each symmetry as flips
    plus a transposed view measured no faster.
    """
    out = torch.empty_like(x)
    for i, sym in enumerate(torch.randint(0, 8, (x.shape[0],), generator=generator).tolist()):
        img = x[i].flip(1) if sym & 4 else x[i]
        out[i].copy_(torch.rot90(img, sym & 3, dims=(0, 1)))
    return out
