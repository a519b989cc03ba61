"""Batches from the decoded-image cache to model-ready tensors, augmentation included.

The cache holds uint8 NHWC images at the dataset's size; everything after the memmap read
happens on whole batches, on the training device. Every random draw comes from the one CPU
`torch.Generator` the caller passes (then moves to the device), so a seed draws the same
augmentation on CPU and GPU (the pixels agree up to float rounding) and a resumed run
repeats its augmentation exactly.

Two paths (docs/augmentation.md):
- flips and 90-degree turns only (the default): each image's symmetry is a uint8 NHWC copy
  (a quarter of the float bytes), and normalising in NHWC then viewing the result as NCHW
  yields a channels_last tensor with no extra copy;
- with a crop, a rotation or colour jitter: the symmetry, crop, rotation and resize to the
  input size are one affine sampling grid per batch (one `grid_sample`), and colour jitter
  plus normalisation are one per-image 3x3 colour matrix and offset, applied per channel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim.config.schema import AugmentConfig

# The grey that contrast and saturation blend toward: ITU-R 601 luma, as torchvision's.
LUMA = torch.tensor([0.299, 0.587, 0.114])
# RGB -> YIQ: hue turns the (I, Q) chroma plane about the luma axis (NVIDIA DALI's hue), a
# linear map, unlike an HSV round trip; greys and every pixel's luma stay as they are.
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def _symmetry_maps() -> torch.Tensor:
    """(8, 2, 2): symmetry s of `random_symmetries` as the map from output to input (x, y)
    sampling coordinates (x along columns): flip(1) negates x, rot90 sends (x, y) to (-y, x)."""
    flip = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    return torch.stack([(flip if s & 4 else torch.eye(2)) @ torch.linalg.matrix_power(turn, s & 3)
                        for s in range(8)])


SYMMETRY_MAPS = _symmetry_maps()


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
        # Per-channel range of a normalised [0, 255] value, as Python numbers: clamping a
        # plane to scalars is ~8x faster on CPU than to a broadcast tensor, and never syncs.
        self.bounds = [(-m / s, (1 - m) / s) for m, s in zip(mean, std)]
        self.luma = LUMA.to(device)

    def __call__(self, images: np.ndarray, generator: torch.Generator | None = None,
                 augment: AugmentConfig | None = None) -> torch.Tensor:
        """Training: `generator` and `augment` given, random augmentation per image;
        either None (evaluation), none."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if generator is None or augment is None or not augment.enabled:
            return self._normalise_resize(x)
        if not (augment.geometric or augment.colour):
            return self._normalise_resize(random_symmetries(x, generator))
        return self._augmented(x, generator, augment)

    def _normalise_resize(self, x: torch.Tensor) -> torch.Tensor:
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

    def _augmented(self, x: torch.Tensor, generator: torch.Generator,
                   augment: AugmentConfig) -> torch.Tensor:
        """Draws in a fixed order (symmetries, crop and rotation, colour), each only where on.
        Works on contiguous NCHW floats in [0, 255]: grid_sample and the per-plane colour
        ops are fastest there; the one channels_last copy comes last."""
        b = x.shape[0]
        symmetry = torch.randint(0, 8, (b,), generator=generator) if augment.flips else None
        if augment.geometric:
            theta = crop_rotation(b, generator, augment)
            if symmetry is not None:
                theta[:, :, :2] = SYMMETRY_MAPS[symmetry] @ theta[:, :, :2]
            x = planar_float(x)
            grid = affine_grid(theta.to(self.device), self.input_size)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        else:
            if symmetry is not None:
                x = apply_symmetries(x, symmetry.tolist())
            x = planar_float(x)
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  antialias=True, align_corners=False)
        if augment.colour:
            x = self._jitter_normalise(x, *colour_jitter(b, generator, augment))
        else:
            x.mul_(self.scale.view(1, 3, 1, 1)).add_(self.shift.view(1, 3, 1, 1))
        return x.contiguous(memory_format=torch.channels_last)

    def _jitter_normalise(self, x: torch.Tensor, matrix: torch.Tensor,
                          grey_weight: torch.Tensor) -> torch.Tensor:
        """x' = matrix @ x + grey_weight * (the image's mean luma), clamped to [0, 255] and
        normalised: one multiply-add chain per output channel, normalisation folded in."""
        offset = torch.zeros(x.shape[0], device=self.device)
        if grey_weight.any():  # contrast on (checked on the CPU copy: no device sync)
            offset = grey_weight.to(self.device) * (x.mean(dim=(2, 3)) @ self.luma)
        matrix = matrix.to(self.device)
        weights = (self.scale[None, :, None] * matrix)[..., None, None]  # (B, 3, 3, 1, 1)
        bias = (self.scale[None] * offset[:, None] + self.shift[None])[..., None, None]
        out = torch.empty_like(x)
        for c, (low, high) in enumerate(self.bounds):
            plane = torch.mul(x[:, 0], weights[:, c, 0], out=out[:, c])
            plane.addcmul_(x[:, 1], weights[:, c, 1]).addcmul_(x[:, 2], weights[:, c, 2])
            plane.add_(bias[:, c]).clamp_(low, high)
        return out


def planar_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> contiguous float NCHW in one pass (~3x faster on CPU than a uint8
    transpose, then a float copy)."""
    b, h, w, c = x.shape
    return torch.empty((b, c, h, w), device=x.device).copy_(x.permute(0, 3, 1, 2))


def random_symmetries(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of an NHWC batch, one of 8 symmetries per image.

    Dermoscopy has no canonical orientation, so these symmetries are label-preserving.
    """
    return apply_symmetries(x, torch.randint(0, 8, (x.shape[0],), generator=generator).tolist())


def apply_symmetries(x: torch.Tensor, symmetries: list[int]) -> torch.Tensor:
    """Symmetry s of image i: flip(1) if s & 4, then rot90 by s & 3 turns.

    Per image, torch's flip / rot90 and one copy into the batch: ~4x faster on CPU than
    gathering the images of each symmetry with boolean masks. The four transposing
    symmetries dominate (a transposed uint8 HWC copy); composing each symmetry as flips
    plus a transposed view measured no faster.
    """
    out = torch.empty_like(x)
    for i, sym in enumerate(symmetries):
        img = x[i].flip(1) if sym & 4 else x[i]
        out[i].copy_(torch.rot90(img, sym & 3, dims=(0, 1)))
    return out


def crop_rotation(b: int, generator: torch.Generator, augment: AugmentConfig) -> torch.Tensor:
    """(b, 2, 3) affine maps from output to input sampling coordinates ([-1, 1], as
    `F.affine_grid`): a square crop of area fraction uniform in [crop_scale, 1] (the aspect
    kept: a stretched lesion changes shape, and asymmetry is diagnostic), turned by an angle
    uniform in [-rotation, rotation] degrees, at a random offset that keeps the turned crop
    inside the image where it fits (else centred; corners beyond the edge are reflected)."""
    u = torch.rand(b, 4, generator=generator)
    smallest = augment.crop_scale or 1.0
    side = (smallest + (1 - smallest) * u[:, 0]).sqrt()
    angle = math.radians(augment.rotation) * (2 * u[:, 1] - 1)
    cos, sin = side * angle.cos(), side * angle.sin()  # the turn, scaled to the crop
    room = (1 - cos.abs() - sin.abs()).clamp(min=0)
    theta = torch.empty(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = (2 * u[:, 2:] - 1) * room[:, None]
    return theta


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`F.affine_grid(theta, (B, C, size, size), align_corners=False)`, built as two
    broadcast sums: ~7x faster on CPU (affine_grid runs a batched matmul of inner size 3)."""
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    grid = torch.empty(theta.shape[0], size, size, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):  # x, then y, of every output pixel (row, column)
        along_columns = (theta[:, k, 0, None] * base)[:, None, :]
        along_rows = (theta[:, k, 1, None] * base + theta[:, k, 2, None])[:, :, None]
        torch.add(along_columns, along_rows, out=grid[..., k])
    return grid


def colour_jitter(b: int, generator: torch.Generator,
                  augment: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, brightness, contrast, saturation, then hue, torchvision's factors (uniform
    in [1 - v, 1 + v]; hue a turn of [-hue, hue]) as one linear map: (b, 3, 3) `matrix` and
    (b,) `grey_weight`, the weight of the image's mean luma added to every channel. Linear
    throughout, so clamping happens once at the end (torchvision clamps after each step)."""
    u = 2 * torch.rand(b, 4, generator=generator) - 1
    brightness, contrast, saturation = (1 + v * u[:, i] for i, v in enumerate(
        (augment.brightness, augment.contrast, augment.saturation)))
    grey = LUMA.expand(3, 3)  # each row the luma weights: RGB -> grey in every channel
    eye = torch.eye(3)
    saturate = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * grey
    angle = 2 * math.pi * augment.hue * u[:, 3]
    turn = eye.repeat(b, 1, 1)
    turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = (
        angle.cos(), -angle.sin(), angle.sin(), angle.cos())
    hue = YIQ_TO_RGB @ turn @ RGB_TO_YIQ
    # Saturation and hue keep greys, so contrast's pull toward the mean grey passes them as is.
    matrix = (contrast * brightness)[:, None, None] * (hue @ saturate)
    return matrix, (1 - contrast) * brightness
