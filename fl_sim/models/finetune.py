"""Partial fine-tuning: which tensors of a model train, and so travel between server and clients.

`finetune.trainable` picks the trainable part, counted from the head backwards:
- `all`: everything (the default);
- `head`: the classifier only (linear probing; the CLIP variant's projection and temperature);
- a fraction f: whole blocks (timm's `group_matcher` groups: stem, each block, head) from the
  head backwards, until they hold at least f of the model's parameter tensors.

The rest is frozen: no gradient, and its modules stay in eval mode while training (frozen
BatchNorm keeps its statistics, frozen dropout is off). Frozen tensors are the weights every
process builds identically (the run's pretrained file, or its seeded init), so messages
carry only the travelling tensors: the trainable parameters and the buffers of the modules
they belong to (e.g. a trainable BatchNorm's running statistics). `frozen_digest` lets a
client check that its frozen tensors are the server's.

A model may also hold private tensors (`keep_private`: FedPer's and FedRep's classifier
head), which train but never travel: each client keeps its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping

import torch
from timm.models import group_parameters
from torch import nn

from fl_sim.errors import FlSimError


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """The model's parameter names in blocks, input to output (the head is the last block)."""
    encoder = getattr(model, "encoder", None)  # the CLIP variant: encoder + projection head
    if encoder is not None and hasattr(model, "projection"):
        head = [n for n, _ in model.named_parameters() if not n.startswith("encoder.")]
        return [[f"encoder.{n}" for n in group] for group in parameter_groups(encoder)] + [head]
    names = [n for n, _ in model.named_parameters()]
    if not hasattr(model, "group_matcher"):
        return [[n] for n in names]  # no blocks exposed: one tensor at a time
    groups = [list(g) for g in group_parameters(model, model.group_matcher(coarse=False)).values()]
    head = classifier_names(model)
    # timm's last group may hold a final norm beside the classifier: the head is its own block.
    body = [[n for n in g if n not in head] for g in groups]
    return [g for g in body if g] + ([head] if head else [])


def classifier_names(model: nn.Module) -> list[str]:
    """Parameter names of the classifier: timm's `get_classifier()`, the CLIP projection and
    temperature; none for a model without a head (num_classes 0)."""
    if hasattr(model, "projection") and hasattr(model, "encoder"):
        return [n for n, _ in model.named_parameters() if not n.startswith("encoder.")]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        return []
    prefix = next(name for name, m in model.named_modules() if m is classifier)
    return [f"{prefix}.{n}" if prefix else n for n, _ in classifier.named_parameters()]


def head_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of the classifier head: its parameters and its modules' buffers."""
    params = set(classifier_names(model))
    keys = set(params)
    for name, module in model.named_modules():
        own = {f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)}
        if own & params:
            keys.update(f"{name}.{b}" if name else b for b in module._buffers)
    return [k for k in model.state_dict() if k in keys]


def keep_private(model: nn.Module, keys: Collection[str]) -> None:
    """`keys` train but never travel (they leave travelling_keys); their values as built stay
    in `model.private_initial`, where a client with none of its own yet starts."""
    model.private_keys = frozenset(keys)
    model.private_initial = OrderedDict((k, v.detach().clone())
                                        for k, v in model.state_dict().items() if k in keys)


@contextlib.contextmanager
def training_only(model: nn.Module, names: Collection[str]) -> Iterator[None]:
    """Of the trainable parameters, only `names` train inside (FedRep's head or body turn);
    the rest are frozen as partial fine-tuning freezes (no gradient, modules in eval)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and name in keep)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def trainable_names(model: nn.Module, trainable: float | str) -> list[str]:
    """The parameter names that train under `finetune.trainable` (see the module doc)."""
    if trainable == "all":
        return [n for n, _ in model.named_parameters()]
    if trainable == "head":
        names = classifier_names(model)
        if not names:
            raise FlSimError("finetune.trainable 'head' needs a model with a classifier head")
        return names
    groups = parameter_groups(model)
    target = math.ceil(float(trainable) * sum(len(g) for g in groups))
    chosen: list[str] = []
    for group in reversed(groups):
        if len(chosen) >= target:
            break
        chosen = group + chosen
    return chosen


def freeze(model: nn.Module, trainable: float | str) -> None:
    """Only `trainable_names` keep requires_grad. `trainable: all` changes nothing."""
    if trainable == "all":
        return
    keep = set(trainable_names(model, trainable))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def is_partial(model: nn.Module) -> bool:
    return not all(p.requires_grad for p in model.parameters())


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), with every frozen submodule back in eval mode. A module without
    parameters (dropout, drop-path, activations) follows its parent."""
    model.train()

    def settle(module: nn.Module) -> None:
        for child in module.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                child.eval()
            elif params:
                settle(child)

    if is_partial(model):
        settle(model)
    return model


def travelling_keys(model: nn.Module) -> list[str]:
    """state_dict keys that messages carry: all of them for a fully trainable model, else the
    trainable parameters and the buffers of the modules that own them; never the private
    ones."""
    private = getattr(model, "private_keys", frozenset())
    keys = [k for k in model.state_dict() if k not in private]
    if not is_partial(model):
        return keys
    travel = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            travel.update(f"{name}.{b}" if name else b for b in module._buffers)
    return [k for k in keys if k in travel]


def travelling_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The part of `model.state_dict()` that messages carry."""
    state = model.state_dict()
    return OrderedDict((k, state[k]) for k in travelling_keys(model))


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a whole state_dict, or a message's travelling tensors (the frozen rest stays as
    built, the private part as it is); anything else means the sender trains another part
    of the model."""
    keys, travel = set(state), set(travelling_keys(model))
    if keys != travel and keys != set(model.state_dict()):
        extra, missing = sorted(keys - travel), sorted(travel - keys)
        raise FlSimError(
            f"the message's tensors are not this model's trainable part: {len(extra)} "
            f"unexpected (e.g. {extra[:3]}), {len(missing)} missing (e.g. {missing[:3]}). "
            "Server and client must run the same model and finetune setting.")
    model.load_state_dict(state, strict=keys == set(model.state_dict()))


def frozen_digest(model: nn.Module) -> str:
    """A hash of the frozen tensors ('' for a fully trainable model): equal in every process
    that built the same weights."""
    if not is_partial(model):
        return ""
    travel = set(travelling_keys(model))
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        if key not in travel:
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
