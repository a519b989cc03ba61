"""The CLIP variant: a timm image encoder trained into the frozen text space of an open_clip model.

The open_clip text tower is run once per process to embed the class prompts, then dropped:
the classifier holds only the K normalised class text features, as a non-persistent buffer.
So the text tower is no submodule of the classifier, never receives a gradient, and nothing
of the text side is in `state_dict()`, which is what goes over the wire. What trains and
travels: the image encoder, the projection into the text space, and the temperature.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import parse_model_name
from torch import nn

from fl_sim.config import ClipConfig, ModelConfig
from fl_sim.errors import FlSimError
from fl_sim.models.registry import create_model

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: keeps the learnt temperature from collapsing


def prompts(templates: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Every template filled with every class name, template-major (T*K texts)."""
    return [t.replace("{class}", name) for t in templates for name in class_names]


# ----------------------------------------------------------------------------- text side


class TextSpace(NamedTuple):
    """What the classifier keeps of an open_clip model."""

    features: torch.Tensor  # (K, D), unit rows: one per class, averaged over templates
    logit_scale: float  # the open_clip model's log temperature


def load_text_tower(text_model: str, pretrained: str | None) -> nn.Module:
    """An open_clip model (with `encode_text`), frozen and in eval mode, on the CPU.

    `text_model` is an open_clip model name (ViT-L-14, RN50x16, ...) or `local-dir:<folder>`
    (a folder with open_clip_config.json and, optionally, its weights); `pretrained` is a tag
    of that model, a local weights file, or None for random init (tests).
    """
    schema, _ = parse_model_name(text_model)
    tag_cfg: dict = {}
    if schema is None:
        if text_model.replace("/", "-") not in open_clip.list_models():
            raise FlSimError(
                f"clip.text_model {text_model!r} is not an open_clip model: use e.g. ViT-L-14, "
                "RN50x16 or RN50x64 (open_clip.list_models() lists them all), or "
                "`local-dir:<folder>` for a folder with an open_clip_config.json."
            )
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(text_model, pretrained)
            if not tag_cfg and not os.path.isfile(pretrained):
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(text_model)) or "none"
                raise FlSimError(
                    f"clip.text_pretrained {pretrained!r} is neither a pretrained tag of "
                    f"{text_model} ({tags}) nor an existing weights file: fix the path, or set "
                    "`clip.text_pretrained: null` for random init (tests only)."
                )
    elif pretrained is not None:
        raise FlSimError(
            f"clip.text_pretrained {pretrained!r} would be ignored: {text_model!r} brings its "
            "own weights. Set `clip.text_pretrained: null`."
        )
    try:
        # A randomly initialised tower (tests) must be the same in the server and every client,
        # whatever their RNG state, and must leave that state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # OpenAI's weights were trained with QuickGELU, which plain configs (ViT-L-14) lack.
            model = open_clip.create_model(text_model, pretrained=pretrained, device="cpu",
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
    except Exception as err:  # download without network, a weights file of another model
        raise FlSimError(
            f"could not build the open_clip text tower {text_model!r} "
            f"(pretrained={pretrained!r}): {err}. Without network, point `clip.text_pretrained` "
            "to a local weights file, or set it to null for random init (tests only)."
        ) from None
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def encode_class_prompts(
    tower: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str],
    class_names: Sequence[str],
) -> torch.Tensor:
    """(K, D) unit class features: each template's embedding normalised, averaged, renormalised.

    All T*K prompts go through the tower in one call.
    """
    tokens = tokenizer(prompts(templates, class_names))
    per_prompt = F.normalize(tower.encode_text(tokens).float(), dim=-1)
    per_class = per_prompt.view(len(templates), len(class_names), -1).mean(0)
    return F.normalize(per_class, dim=-1)


@functools.lru_cache(maxsize=4)
def class_text_features(
    text_model: str,
    pretrained: str | None,
    templates: tuple[str, ...],
    class_names: tuple[str, ...],
) -> TextSpace:
    """The class text features of `text_model`, computed once per process (then cached).

    The tower is freed on return: only the (K, D) features are kept. Callers must not
    modify the cached tensor in place (the classifier keeps a copy).
    """
    tower = load_text_tower(text_model, pretrained)
    tokenizer = open_clip.get_tokenizer(text_model)
    features = encode_class_prompts(tower, tokenizer, templates, class_names)
    log.info("class text features of %s (%s): %s", text_model, pretrained, tuple(features.shape))
    return TextSpace(features, float(tower.logit_scale.detach().reshape(())))


# ----------------------------------------------------------------------------- image side


class ClipClassifier(nn.Module):
    """Image encoder -> linear projection -> cosine similarity with the K class prompts.

    `forward` returns (B, K) logits, so evaluation (argmax, CE) is the supervised one.
    `state_dict()` holds `encoder.*`, `projection.*` and `logit_scale`, nothing else.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, text: TextSpace,
                 learn_temperature: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Linear(feature_dim, text.features.shape[1])
        scale = torch.tensor(text.logit_scale).clamp(max=math.log(MAX_LOGIT_SCALE))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:  # persistent: a checkpoint reloads with the temperature it was trained with
            self.register_buffer("logit_scale", scale)
        # Non-persistent: moves with .to(device) but is never in state_dict, so never sent.
        self.register_buffer("text_features", text.features.clone(), persistent=False)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), at most 100. In training `clamp_temperature` keeps logit_scale at
        most ln 100 after every step, as CLIP does: a clamp inside the graph would zero the
        gradient of a temperature that sits at the bound, as OpenAI's towers' does. In
        evaluation the clamp is applied here (a server step may have pushed t past it)."""
        scale = self.logit_scale.exp()
        return scale if self.training else scale.clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """logit_scale back to at most ln 100, after an optimizer step."""
        self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) unit image embeddings in the text space."""
        feats = self.encoder(x)
        # fp32 outside autocast: at scale 100, bf16 cosines would shift logits by ~0.4.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(self.projection(feats.float()), dim=-1)

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, K) scaled cosine similarities with the class prompts."""
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            return self.scale() * image_features @ self.text_features.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_logits(self.image_features(x))


def create_clip_model(
    model_cfg: ModelConfig, clip_cfg: ClipConfig, class_names: Sequence[str], image_size: int
) -> ClipClassifier:
    """The CLIP variant for `class_names`, readable ones (FederatedData.class_names).

    The encoder is the registry's backbone without a head (timm's pooled features).
    """
    text = class_text_features(clip_cfg.text_model, clip_cfg.text_pretrained,
                               tuple(clip_cfg.templates), tuple(class_names))
    encoder = create_model(model_cfg, num_classes=0, image_size=image_size)
    feature_dim = getattr(encoder, "head_hidden_size", None) or encoder.num_features
    return ClipClassifier(encoder, feature_dim, text, clip_cfg.learn_temperature)


# ----------------------------------------------------------------------------- losses


def clip_loss(image_features: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """The paper's symmetric image-text contrastive loss (eq. 2) over a batch.

    Image i is paired with the prompt feature of its class, T_b = text_features[labels];
    logits = logit_scale * I @ T_b^T (B x B; logit_scale is the multiplier, already exp'd);
    the loss is the mean of the image->text and text->image cross-entropies with the
    diagonal as targets.

    Same-class pairs are not punished: their texts are identical copies, so in each image's
    row their logits equal the diagonal's, and the text rows of one class are identical; the
    diagonal targets then give exactly the loss with every same-class pair as a positive
    (uniform targets over them, both ways). See docs/clip.md.
    """
    # fp32 outside autocast: at scale 100, bf16 logits are off by ~0.4 (see image_features).
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        logits_per_image = (logit_scale.float() * image_features.float()
                            @ text_features[labels].float().T)
        targets = torch.arange(len(labels), device=labels.device)
        return (F.cross_entropy(logits_per_image, targets)
                + F.cross_entropy(logits_per_image.T, targets)) / 2


def class_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each image over the K class prompts (logits from `class_logits`)."""
    return F.cross_entropy(logits, labels)


def clip_batch_loss(model: ClipClassifier, x: torch.Tensor, y: torch.Tensor,
                    kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch (`kind` is `clip.loss` of the run config) and the
    batch's class logits (for the training accuracy)."""
    features = model.image_features(x)
    logits = model.class_logits(features)
    if kind == "clip":
        return clip_loss(features, y, model.text_features, model.scale()), logits
    if kind == "class_ce":
        return class_ce_loss(logits, y), logits
    raise ValueError(f"unknown CLIP loss {kind!r}: use clip or class_ce")
