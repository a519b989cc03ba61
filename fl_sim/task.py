"""Data and model for one process (a client actor, a SuperNode's app, the server), kept alive.

Ray reuses each actor process for many messages, and a SuperNode's ClientApp process for
one; caching at module level means a round costs one weight load, not a model build and
a dataset open. Weights are overwritten from the message every time, so one model per
process serves every partition that the process happens to run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fl_sim.config import PRIVATE_HEAD, DataConfig, RunConfig
from fl_sim.data_partition import FederatedData, prepare_data
from fl_sim.errors import FlSimError
from fl_sim.models import create_model, normalization
from fl_sim.models.clip import create_clip_model
from fl_sim.models.finetune import freeze, frozen_digest, head_keys, keep_private
from fl_sim.privacy.dpsgd import prepare_for_dpsgd
from fl_sim.transforms import BatchPreprocessor


@functools.lru_cache(maxsize=2)
def load_data(data_json: str) -> FederatedData:
    """The dataset (a memmap of the decoded-image cache) and its partition, once per process."""
    return prepare_data(DataConfig.model_validate_json(data_json), progress=False)


def build_model(cfg: RunConfig, class_names: Sequence[str],
                image_size: int) -> tuple[nn.Module, BatchPreprocessor]:
    """A fresh model of the run (initial weights from the run's seed) on this process's
    device, and the matching batch preprocessor. `class_names` are the readable names: the
    CLIP variant writes them into its prompts."""
    torch.manual_seed(cfg.seed)
    if cfg.training == "clip":
        model = create_clip_model(cfg.model, cfg.clip, class_names, image_size)
    else:
        model = create_model(cfg.model, len(class_names), image_size)
    if cfg.privacy and cfg.privacy.sample_level:
        model = prepare_for_dpsgd(model, cfg.model.input_size or image_size)  # in every process
    freeze(model, cfg.finetune.trainable)  # the frozen part stays as built, in every process
    if cfg.strategy.name in PRIVATE_HEAD:  # FedPer / FedRep: each client's head is its own
        head = head_keys(model)
        if not head:
            raise FlSimError(f"strategy {cfg.strategy.name} keeps each client's classifier "
                             f"head, and {cfg.model.name} has none")
        keep_private(model, head)
    model = model.to(device()).to(memory_format=torch.channels_last)
    input_size = cfg.model.input_size or image_size
    return model, BatchPreprocessor(input_size, normalization(cfg.model), device())


def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """Refuse an input size the model cannot take (a feature map shrunk below a kernel),
    naming the smallest it takes: found by a forward pass of one blank image per size."""
    def takes(side: int) -> bool:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side, device=next(model.parameters()).device))
            return True
        except RuntimeError:
            return False

    was_training = model.training
    model.eval()
    try:
        if takes(size):
            return
        low, high = size, size * 2
        while not takes(high):  # the first size it takes, by doubling...
            low, high = high, high * 2
            if high > 4096:
                raise FlSimError(f"model {name} takes no input size up to 4096 px.")
        while high - low > 1:  # ...then the smallest, by bisection
            middle = (low + high) // 2
            low, high = (low, middle) if takes(middle) else (middle, high)
    finally:
        model.train(was_training)
    raise FlSimError(f"model {name} cannot take {size} px images (its feature maps shrink below "
                     f"a kernel): the smallest it takes is {high} px. Raise data.image_size (or "
                     "model.input_size) to at least that.")


def device() -> torch.device:
    """This process's training device: the GPU where there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=1)
def load_model(run_json: str, class_names: tuple[str, ...],
               image_size: int) -> tuple[nn.Module, BatchPreprocessor]:
    """build_model, once per process: clients overwrite the weights from every message."""
    return build_model(RunConfig.model_validate_json(run_json), class_names, image_size)


@functools.lru_cache(maxsize=1)
def model_frozen_digest(run_json: str, class_names: tuple[str, ...], image_size: int) -> str:
    """frozen_digest of load_model's model, once per process: frozen tensors never change."""
    return frozen_digest(load_model(run_json, class_names, image_size)[0])


def client_rng(seed: int, partition_id: int, server_round: int, stream: int) -> np.random.Generator:
    """Randomness that depends on (seed, client, round), not on which process runs it."""
    torch.manual_seed(seed * 1_000_003 + partition_id * 10_007 + server_round * 101 + stream)
    return np.random.default_rng([seed, partition_id, server_round, stream])
