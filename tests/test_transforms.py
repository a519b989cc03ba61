"""Batch preprocessing and augmentation on tensors."""

import numpy as np
import pytest
import torch

from fl_sim.config.schema import AugmentConfig
from fl_sim.transforms import LUMA, BatchPreprocessor, affine_grid, random_symmetries


def symmetries(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of one HWC image."""
    return [torch.rot90(img.flip(1) if s & 4 else img, s & 3, dims=(0, 1)) for s in range(8)]


def test_augment_gives_each_image_one_of_its_eight_symmetries():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (64, 5, 5, 3), dtype=np.uint8))
    out = random_symmetries(x, torch.Generator().manual_seed(0))
    seen = set()
    for before, after in zip(x, out):
        matches = [s for s, v in enumerate(symmetries(before)) if torch.equal(v, after)]
        assert matches, "not a symmetry of its input"
        seen.add(matches[0])
    assert len(seen) == 8  # all symmetries drawn over 64 images
    again = random_symmetries(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # same generator seed, same batch


def test_preprocessing_normalises_resizes_and_is_channels_last():
    images = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    images[:, :, :, 1] = 0
    x = BatchPreprocessor(8, ((0.5, 0.5, 0.5), (0.25, 0.5, 0.5)), torch.device("cpu"))(images)
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[:, 0], torch.tensor(2.0)) and torch.allclose(x[:, 1], torch.tensor(-1.0))
    y = BatchPreprocessor(16, None, torch.device("cpu"))(images)
    assert y.shape == (2, 3, 16, 16) and torch.allclose(y.aminmax()[0], torch.tensor(0.0))
    assert torch.allclose(y.max(), torch.tensor(1.0))


def test_normalisation_matches_the_per_channel_formula():
    images = np.random.default_rng(1).integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = BatchPreprocessor(9, (mean, std), torch.device("cpu"))(images)
    expected = (torch.from_numpy(images).float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x, expected.permute(0, 3, 1, 2), atol=1e-5)


FULL = AugmentConfig(crop_scale=0.7, rotation=15, brightness=0.2, contrast=0.2, saturation=0.2,
                     hue=0.02)
CPU = torch.device("cpu")


def run(images: np.ndarray, augment: AugmentConfig, seed: int = 0, size: int | None = None,
        normalization=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))) -> torch.Tensor:
    pre = BatchPreprocessor(size or images.shape[1], normalization, CPU)
    return pre(images, torch.Generator().manual_seed(seed), augment)


def random_images(n: int = 16, size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_options_at_their_off_values_are_the_flips_only_path():
    images = random_images()
    flips = run(images, AugmentConfig())
    off = AugmentConfig(crop_scale=1, rotation=0, brightness=0, contrast=0, saturation=0, hue=0)
    assert not (off.geometric or off.colour) and torch.equal(run(images, off), flips)
    plain = BatchPreprocessor(12, ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), CPU)(images)
    assert torch.equal(run(images, AugmentConfig(flips=False)), plain)  # all off: no augmentation


@pytest.mark.parametrize("augment", [
    AugmentConfig(rotation=1e-9),  # the symmetries folded into the sampling grid
    AugmentConfig(brightness=1e-9, contrast=1e-9, saturation=1e-9, hue=1e-9),  # colour matrices
    AugmentConfig(rotation=1e-9, crop_scale=1 - 1e-9, brightness=1e-9, hue=1e-9),
])
def test_the_general_path_at_near_zero_strength_equals_the_flips_only_path(augment):
    images = random_images()
    assert torch.allclose(run(images, augment), run(images, AugmentConfig()), atol=1e-4)


def test_same_seed_same_batch_and_the_output_contract():
    images = random_images(size=24)
    out = run(images, FULL, seed=3, size=16)
    assert torch.equal(out, run(images, FULL, seed=3, size=16))
    assert not torch.allclose(out, run(images, FULL, seed=4, size=16))
    assert out.shape == (16, 3, 16, 16) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_geometry_keeps_each_image_in_its_place_in_the_batch():
    """Labels stay paired: a constant image stays constant, at its own index."""
    colours = np.random.default_rng(2).integers(0, 256, (16, 3), dtype=np.uint8)
    images = np.broadcast_to(colours[:, None, None], (16, 10, 10, 3)).copy()
    out = run(images, AugmentConfig(crop_scale=0.5, rotation=30), normalization=None)
    expected = torch.from_numpy(colours).float()[:, :, None, None] / 255
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


def test_crop_zooms_in_and_keeps_the_shape():
    ramp = np.linspace(0, 255, 32).astype(np.uint8)  # along columns
    images = np.broadcast_to(ramp[None, None, :, None], (8, 32, 32, 3)).copy()
    out = run(images, AugmentConfig(flips=False, crop_scale=0.25), normalization=None)
    assert out.shape == (8, 3, 32, 32)
    spans = out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))
    # a crop of side s in [0.5, 1] sees ~s of the ramp (the whole image: 1), s per image
    assert (spans > 0.45).all() and (spans < 0.97).all() and spans.std() > 0.05


def test_rotation_turns_about_the_centre():
    yy, xx = np.mgrid[:33, :33] - 16
    blob = (255 * np.exp(-(xx**2 + yy**2) / 60)).astype(np.uint8)
    bar = np.where(np.abs(yy) < 3, 255, 0).astype(np.uint8)  # a horizontal bar
    images = np.stack([np.repeat(a[:, :, None], 3, 2) for a in (blob, bar)] * 4)
    out = run(images, AugmentConfig(flips=False, rotation=30), normalization=None)
    source = torch.from_numpy(images[:, :, :, 0]).float() / 255
    assert torch.allclose(out[0::2, 0], source[0::2], atol=0.03)  # a round blob: unchanged
    assert (out[1::2, 0] - source[1::2]).abs().amax() > 0.3  # the bar turned
    assert torch.allclose(out[1::2, 0, 16, 16], torch.tensor(1.0))  # around the centre


def grey_images(values: list[int], size: int = 6) -> np.ndarray:
    return np.broadcast_to(np.array(values, dtype=np.uint8)[:, None, None, None],
                           (len(values), size, size, 3)).copy()


def test_brightness_scales_each_image_by_its_own_factor():
    out = run(grey_images([100] * 16), AugmentConfig(flips=False, brightness=0.5), normalization=None)
    factors = out.mean(dim=(1, 2, 3)) * 255 / 100
    assert ((factors >= 0.5) & (factors <= 1.5)).all() and factors.std() > 0.1
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))  # still grey and flat


def test_contrast_keeps_the_mean_luma_and_scales_the_spread():
    images = grey_images([100] * 16, size=8)
    images[:, :, 4:] = 140
    out = run(images, AugmentConfig(flips=False, contrast=0.5), normalization=None) * 255
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.tensor(120.0), atol=1e-3)
    spread = (out[:, 0, 0, 4:].mean(1) - out[:, 0, 0, :4].mean(1)) / 40
    assert ((spread >= 0.5) & (spread <= 1.5)).all() and spread.std() > 0.1


def test_saturation_and_hue_keep_greys_and_each_pixels_luma():
    greys = grey_images(list(range(0, 256, 17)))
    strong = AugmentConfig(flips=False, saturation=1, hue=0.5)
    assert torch.allclose(run(greys, strong, normalization=None) * 255,
                          torch.from_numpy(greys).permute(0, 3, 1, 2).float(), atol=1e-3)
    colours = np.random.default_rng(3).integers(90, 160, (16, 6, 6, 3), dtype=np.uint8)
    out = run(colours, AugmentConfig(flips=False, hue=0.1), normalization=None)
    before = torch.from_numpy(colours).float() / 255
    luma = torch.einsum("bchw,c->bhw", out, LUMA)
    assert torch.allclose(luma, before @ LUMA, atol=1e-4)
    assert (out - before.permute(0, 3, 1, 2)).abs().amax() > 0.02


def test_affine_grid_matches_torch():
    theta = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, (4, 3, 7, 7), align_corners=False)
    assert torch.allclose(affine_grid(theta, 7), expected, atol=1e-6)
