"""Models: the backbone registry over timm, pretrained weights that work offline (the CLIP
variant is in fl_sim.models.clip)."""

from fl_sim.models.registry import PAPER_BACKBONES, create_model, normalization, timm_name
from fl_sim.models.weights import EMBEDDED, load_weights, read_weights_file

__all__ = ["EMBEDDED", "PAPER_BACKBONES", "create_model", "load_weights", "normalization",
           "read_weights_file", "timm_name"]
