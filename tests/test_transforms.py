"""Batch preprocessing and augmentation on tensors."""

import numpy as np
import torch

from fl_sim.transforms import BatchPreprocessor, augment


def symmetries(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of one HWC image."""
    return [torch.rot90(img.flip(1) if s & 4 else img, s & 3, dims=(0, 1)) for s in range(8)]


def test_augment_gives_each_image_one_of_its_eight_symmetries():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (64, 5, 5, 3), dtype=np.uint8))
    out = augment(x, torch.Generator().manual_seed(0))
    seen = set()
    for before, after in zip(x, out):
        matches = [s for s, v in enumerate(symmetries(before)) if torch.equal(v, after)]
        assert matches, "not a symmetry of its input"
        seen.add(matches[0])
    assert len(seen) == 8  # all symmetries drawn over 64 images
    again = augment(x, torch.Generator().manual_seed(0))
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
