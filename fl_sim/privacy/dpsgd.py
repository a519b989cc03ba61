"""Sample-level DP-SGD at a client, with Opacus: per-image gradients (ExpandedWeights),
clipped and noised by its DPOptimizer, on batches drawn by Poisson sampling.

fl-sim's own batch loop stays: each of an epoch's ceil(n / batch_size) steps takes every
train image with probability 1 / ceil(n / batch_size), as Opacus's DPDataLoader would. The
number of steps is therefore fixed by n, so the server can book (and foresee) every
client's privacy cost (fl_sim.privacy.ledger). An empty draw trains nothing but still
counts as a step.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from opacus.grad_sample import GradSampleModuleExpandedWeights
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from timm.layers.norm_act import BatchNormAct2d, GroupNormAct
from torch import nn

from fl_sim.errors import FlSimError

if TYPE_CHECKING:
    from fl_sim.config.schema import SampleLevelDPConfig


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def sample_rate(n: int, batch_size: int) -> float:
    """The probability that a step's batch holds a given image (Opacus's 1 / len(loader))."""
    return 1.0 / steps_per_epoch(n, batch_size)


def poisson_batches(indices: np.ndarray, batch_size: int, epochs: int,
                    rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """`epochs` x steps_per_epoch batches, each a Poisson sample of `indices` (sorted). The
    draws must be secret (the guarantee counts on it): without `rng`, from OS entropy."""
    rng = rng or np.random.default_rng()
    q = sample_rate(len(indices), batch_size)
    for _ in range(epochs * steps_per_epoch(len(indices), batch_size)):
        yield np.sort(indices[rng.random(len(indices)) < q])


def _group_norm(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A GroupNorm for `bn`: as many groups as divide its channels, up to 32; BatchNorm's
    (pretrained) scale and shift; timm's fused activation kept."""
    channels = bn.num_features
    groups = math.gcd(32, channels)
    if isinstance(bn, BatchNormAct2d):
        norm = GroupNormAct(channels, groups, eps=bn.eps, affine=bn.affine, apply_act=False)
        norm.drop, norm.act = bn.drop, bn.act
    else:
        norm = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            norm.weight.copy_(bn.weight)
            norm.bias.copy_(bn.bias)
    return norm


def prepare_for_dpsgd(model: nn.Module, input_size: int) -> nn.Module:
    """`model` (changed in place) as Opacus needs it: every BatchNorm layer a GroupNorm (a
    per-image gradient must not depend on the batch) and no in-place activation (per-image
    gradients need the layers' outputs as they were); checked by its ModuleValidator."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _group_norm(module))
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    errors = ModuleValidator.validate(model, strict=False)
    try:  # ExpandedWeights covers layers, not parameters used outside them: try two images
        if not errors:
            probe = GradSampleModuleExpandedWeights(model, batch_first=True)
            probe(torch.zeros(2, 3, input_size, input_size)).sum().backward()
            probe.cleanup()
            model.zero_grad(set_to_none=True)
    except RuntimeError as err:
        errors = [str(err).splitlines()[0]]
    if errors:
        raise FlSimError(
            f"privacy.sample_level: no per-image gradients through this model "
            f"({'; '.join(map(str, errors[:3]))}). Models that work: resnet*, efficientnet*, "
            "tf_efficientnet_lite0 (not ConvNeXt, ViT or Swin: their LayerScale and "
            "position embeddings are parameters outside a layer).")
    return model


def _device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.requires_grad)


@contextmanager
def private_training(model: nn.Module, optimizer: torch.optim.Optimizer,
                     dp: SampleLevelDPConfig, n: int, batch_size: int
                     ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """The model's forward with per-image gradients and Opacus's DPOptimizer around
    `optimizer`; the per-image state comes off on exit (the model is reused every round).
    Per-image gradients come from torch's ExpandedWeights (Opacus's `ew` mode): its default
    hooks forbid an in-place change of a layer's output, which timm's ResNet blocks make
    (`x += shortcut`)."""
    forward = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
    # The noise must be secret: its generator is seeded from OS entropy, not the run's seed.
    private = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier,
                          max_grad_norm=dp.max_grad_norm,
                          expected_batch_size=max(1, round(n * sample_rate(n, batch_size))),
                          generator=torch.Generator(device=_device(model)).manual_seed(
                              secrets.randbits(63)))  # on the noise's device
    try:
        yield forward, private
    finally:
        private.zero_grad(set_to_none=True)  # the summed gradients off the parameters
        forward.cleanup()  # and the per-image ones, with their attributes
