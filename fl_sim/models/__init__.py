"""Models: the backbone registry over timm (the CLIP variant is in fl_sim.models.clip)."""

from fl_sim.models.registry import PAPER_BACKBONES, create_model, normalization, timm_name

__all__ = ["PAPER_BACKBONES", "create_model", "normalization", "timm_name"]
