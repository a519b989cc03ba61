"""Backbone registry over timm: the paper's 12 short names, plus any timm model name."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from fl_sim.config import ModelConfig
from fl_sim.errors import FlSimError
from fl_sim.models.weights import EMBEDDED, hub_overlay, load_weights, read_weights_file

# The paper's backbones (torchvision-style names) and their timm equivalents.
PAPER_BACKBONES: dict[str, str] = {
    "convnext_t": "convnext_tiny",
    "convnext_s": "convnext_small",
    "convnext_b": "convnext_base",
    "convnext_l": "convnext_large",
    "maxvit_t": "maxvit_tiny_tf_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
    "swin_v2_t": "swinv2_tiny_window8_256",
    "swin_v2_s": "swinv2_small_window8_256",
    "swin_v2_b": "swinv2_base_window8_256",
    "vit_l_16": "vit_large_patch16_224",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_name(name: str) -> str:
    """The timm model name behind a short name (or the name itself)."""
    resolved = PAPER_BACKBONES.get(name, name)
    if not timm.is_model(resolved):
        raise FlSimError(
            f"model {name!r} is neither a short name ({', '.join(PAPER_BACKBONES)}) nor a timm "
            "model; `python -c \"import timm; print(timm.list_models('*convnext*'))\"` lists timm's."
        )
    return resolved


def create_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A timm backbone with a fresh head for `num_classes`, weights as `cfg.pretrained` says:
    true: the embedded weights (EMBEDDED) if any, else timm's from the Hugging Face hub (or
    its cache); a path: a local weights file; false: random init."""
    name = timm_name(cfg.name)
    kwargs = dict(cfg.kwargs)
    if _takes_img_size(name):
        kwargs.setdefault("img_size", cfg.input_size or image_size)
    weights = cfg.pretrained
    from_hub = weights is True and name not in EMBEDDED
    overlay = hub_overlay(name, cfg.name) if from_hub else {}
    try:
        model = timm.create_model(name, pretrained=from_hub, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as err:  # a failed download, a bad kwarg: both need the user's action
        hint = ("Without network, set `pretrained: false` or point it to a local weights file."
                if from_hub else f"Check model.kwargs {dict(cfg.kwargs)}: timm's arguments of "
                "this model." if cfg.kwargs else "")
        raise FlSimError(
            f"could not build model {cfg.name!r} (timm {name!r}, pretrained={weights}): {err}. "
            f"{hint}".rstrip()) from None
    if weights is True and not from_hub:
        load_weights(model, EMBEDDED[name](), f"the embedded {name} weights", cfg.strict)
    elif isinstance(weights, Path):
        load_weights(model, read_weights_file(weights), f"weights file {weights}", cfg.strict)
    return model


def normalization(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) for the model's inputs, or None for no normalisation."""
    if cfg.normalize == "none":
        return None
    if cfg.normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    pcfg = timm.get_pretrained_cfg(timm_name(cfg.name))
    if pcfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(pcfg.mean), tuple(pcfg.std)


def _takes_img_size(name: str) -> bool:
    """Transformers fix their input size at build time; CNNs take any size."""
    return name.split("_")[0] in {"vit", "swin", "swinv2", "maxvit", "deit", "beit", "eva"}
