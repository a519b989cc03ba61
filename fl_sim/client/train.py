"""Local training of one client: optimizers with the paper's defaults, epochs, FedProx, and
the run's recipe (loss, sampler, the round's learning rate). Federated clients and the
pooled and local baselines all train through `train_local`, so a recipe never differs
between them by accident."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from fl_sim.client.node_state import KeptOptimizer
from fl_sim.client.recipe import epoch_order, make_loss
from fl_sim.config import OptimizerConfig, RunConfig
from fl_sim.evaluation import autocast
from fl_sim.models.clip import clip_batch_loss
from fl_sim.models.finetune import train_mode
from fl_sim.privacy.dpsgd import poisson_batches, private_training
from fl_sim.strategies.fedprox import proximal_term
from fl_sim.transforms import BatchPreprocessor

# The paper's settings (Wu et al.), overridable per key in experiments.yaml.
OPTIMIZER_DEFAULTS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "weight_decay": 5e-4, "momentum": 0.0},
    "adam": {"lr": 1e-3, "weight_decay": 0.02, "betas": (0.9, 0.98)},
    "adamw": {"lr": 1e-3, "weight_decay": 0.02, "betas": (0.9, 0.98)},
    "adagrad": {"lr": 1e-3, "weight_decay": 5e-4},
    "adadelta": {"lr": 1e-3, "weight_decay": 5e-4},
}
_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
}


def optimizer_kwargs(cfg: OptimizerConfig) -> dict:
    """The paper's defaults for `cfg.name`, overridden by what the config sets."""
    kwargs = dict(OPTIMIZER_DEFAULTS[cfg.name])
    kwargs.update(cfg.model_dump(exclude={"name"}, exclude_none=True))
    return kwargs


def make_optimizer(model: nn.Module, cfg: OptimizerConfig,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """`lr`, the round's learning rate from the schedule, replaces the configured one."""
    # CLIP's temperature takes no weight decay (decay would pull the logit scale toward 1).
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n != "logit_scale"]}]
    no_decay = [p for n, p in named if n == "logit_scale"]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = optimizer_kwargs(cfg)
    if lr is not None:
        kwargs["lr"] = lr
    return _OPTIMIZERS[cfg.name](groups, **kwargs)


def _batches(indices: np.ndarray, labels: np.ndarray, cfg: RunConfig,
             rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The rows of each step: `cfg.local_epochs` epochs in `cfg.sampler`'s order, or
    `cfg.local_steps` batches of as many such epochs as they take (the last one cut short),
    or under DP-SGD Poisson draws (an empty draw is skipped: nothing to train, the step is
    booked)."""
    if cfg.privacy and cfg.privacy.sample_level:
        yield from (idx for idx in poisson_batches(indices, cfg.batch_size, cfg.local_epochs)
                    if len(idx))
        return
    if len(indices) == 0:
        return
    steps = 0
    for _ in itertools.count() if cfg.local_steps else range(cfg.local_epochs):
        order = epoch_order(indices, labels, cfg.sampler, rng)
        for start in range(0, len(order), cfg.batch_size):
            # Sorted rows read the memmap sequentially; the batch's order does not matter.
            idx = np.sort(order[start:start + cfg.batch_size])
            if len(idx) < 2 and len(order) > 1:
                continue  # a batch of one breaks BatchNorm; its image returns next epoch
            yield idx
            steps += 1
            if steps == cfg.local_steps:
                return


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    preprocess: BatchPreprocessor,
    cfg: RunConfig,
    rng: np.random.Generator,
    proximal_mu: float = 0.0,
    lr: float | None = None,
    gradient_correction: dict[str, torch.Tensor] | None = None,
    kept: KeptOptimizer | None = None,
    federation_counts: np.ndarray | None = None,
    anchor: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """`cfg.local_epochs` epochs (or `cfg.local_steps` steps) of the run's loss from the
    current weights, at learning rate `lr` (the schedule's for this round; None: the
    optimizer's), plus the proximal term (mu/2)·‖w − anchor‖² where `proximal_mu` > 0:
    FedProx's, toward the weights it starts from, or Ditto's, toward `anchor` (the trainable
    parameters of the round's global model).
    `gradient_correction` (SCAFFOLD's c - c_i, by parameter name) is added to each gradient.
    Under `privacy.sample_level` the steps are DP-SGD's (fl_sim.privacy.dpsgd).

    A fresh optimizer each round, as in FedAvg: optimizer state is local and not federated;
    with `kept` (client_state: keep) it starts from the state the last round left, and
    leaves its own for the next. `federation_counts`: the federation's class counts, for
    `loss.class_weights: federation`.
    Returns the mean training loss (without the proximal term), the training accuracy of
    the batches as they were trained on, the number of steps, and where it trained
    (`device_report`).
    """
    device = preprocess.device
    train_mode(model)  # frozen parts (partial fine-tuning) stay in eval mode
    optimizer = make_optimizer(model, cfg.optimizer, lr)
    if kept is not None:
        kept.load(optimizer)
    criterion = make_loss(cfg.loss, labels[indices], federation_counts)
    global_params = None if proximal_mu == 0 else anchor or [
        p.detach().clone() for p in model.parameters() if p.requires_grad]
    corrected = [(n, p) for n, p in model.named_parameters()
                 if gradient_correction and n in gradient_correction]
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    dp = cfg.privacy.sample_level if cfg.privacy else None
    # The loss is summed on the device: no per-step sync, so the host prepares the next batch
    # while the GPU computes.
    total, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    seen, steps = 0, 0
    with (private_training(model, optimizer, dp, len(indices), cfg.batch_size) if dp
          else nullcontext((model, optimizer))) as (forward, optimizer):
        for idx in _batches(indices, labels, cfg, rng):
            # Before the forward pass: DP-SGD's per-image gradients must be cleared by then.
            optimizer.zero_grad(set_to_none=True)
            x = preprocess(images[idx], generator, cfg.augment)
            y = torch.from_numpy(labels[idx]).to(device)
            with autocast(device, enabled=dp is None):  # per-image gradients in fp32
                if cfg.training == "clip":
                    loss, logits = clip_batch_loss(model, x, y, cfg.clip.loss)
                else:
                    logits = forward(x).float()
                    loss = criterion(logits, y)
            objective = loss
            if global_params is not None:
                objective = loss + proximal_term(model, global_params, proximal_mu)
            objective.backward()
            for name, param in corrected:  # SCAFFOLD: g + c - c_i
                param.grad.add_(gradient_correction[name])
            optimizer.step()
            if cfg.training == "clip":
                model.clamp_temperature()
            total += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(idx)
            steps += 1
    if kept is not None:
        kept.save(optimizer)
    return {"train_loss": total.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
            "steps": steps, **device_report(device)}


def device_report(device: torch.device) -> dict[str, float]:
    """Where this process trained, as numbers a reply can carry: `cuda_device`, the CUDA
    device index (-1: the CPU), and `gpu_peak_mb`, the most GPU memory torch's allocator has
    reserved in this process so far (a Ray actor's peak; 0 on the CPU)."""
    if device.type != "cuda":
        return {"cuda_device": -1, "gpu_peak_mb": 0.0}
    index = torch.cuda.current_device() if device.index is None else device.index
    return {"cuda_device": index, "gpu_peak_mb": torch.cuda.max_memory_reserved(index) / 2**20}
