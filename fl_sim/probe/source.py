"""What a probe reads from a finished run folder: its config, a checkpoint, the data (checked
against the run's partition.csv) and the weights of the model, or of each client's model."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from flwr.app import ArrayRecord
from pydantic import ValidationError

from fl_sim.client.fedbn import GLOBAL_BATCHNORM
from fl_sim.config import PRIVATE_HEAD, DataConfig, RunConfig, format_validation_error
from fl_sim.data_partition import FederatedData, prepare_data
from fl_sim.data_partition.federated import MANIFEST_COLUMNS
from fl_sim.errors import FlSimError
from fl_sim.server.baselines import client_state
from fl_sim.server.run_log import read_summary

CHECKPOINTS = ("best", "last")


@dataclass
class ProbedRun:
    """A finished run as the probe sees it."""

    run_dir: Path
    cfg: RunConfig
    data: FederatedData
    checkpoint: str  # best or last
    round: int
    # None -> the one model every client shares; k -> client k's own model (local runs).
    states: dict[int | None, OrderedDict[str, torch.Tensor]]
    unfinished: str | None = None  # why the run is not complete (--allow-unfinished)

    @property
    def per_client_models(self) -> bool:
        return None not in self.states

    @property
    def model_note(self) -> str:
        if self.per_client_models:
            return "each client's own model (local run): a client's features come from its model"
        note = "the global model"
        if self.cfg.strategy.name == "fedbn":
            note += f" (its BatchNorm layers: {GLOBAL_BATCHNORM})"
        return note


def load_run(run_dir: Path, checkpoint: str = "best", data_root: Path | None = None,
             allow_unfinished: bool = False) -> ProbedRun:
    """The run in `run_dir` at checkpoints/<checkpoint>.pt, its data from config.yaml (root
    replaced by `data_root`), refusing data that does not split as the run's did, and a run
    that is not complete unless `allow_unfinished`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise FlSimError(f"run folder {run_dir} {what}: pass <out>/<study>/<run>, a "
                         "folder that `fl-sim run` wrote.")
    summary = read_summary(run_dir)
    unfinished = None
    if not summary.get("complete", False):
        unfinished = (f"the run is not complete ({summary.get('rounds_done', 0)} of "
                      f"{summary.get('rounds', '?')} rounds finished)")
        if not allow_unfinished:
            raise FlSimError(f"{run_dir}: {unfinished}, so its checkpoints are not its final "
                             "models. Finish it (run the study again), or pass "
                             "--allow-unfinished to probe what it has (probe.json says so).")
    if checkpoint not in CHECKPOINTS:
        raise FlSimError(f"--checkpoint {checkpoint!r}: use best or last.")
    data_cfg, cfg = _read_config(run_dir / "config.yaml", data_root)
    if cfg.strategy.name in PRIVATE_HEAD:
        raise FlSimError(f"{run_dir} is a {cfg.strategy.name} run: each client's head never "
                         "left it, so the server holds no model to probe.")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise FlSimError(f"{path} not found: the run saved no {checkpoint} checkpoint yet (it "
                         "is written after each finished round). Finish the run, or pick the "
                         "other with --checkpoint.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file: torch raises several kinds
        raise FlSimError(f"{path} cannot be read ({type(err).__name__}: {err}): a damaged "
                         "checkpoint. Try --checkpoint with the other one.") from None
    data = prepare_data(data_cfg)
    if list(ckpt["classes"]) != data.classes:
        raise FlSimError(f"{path} was trained on the classes {ckpt['classes']}, but the data of "
                         f"{run_dir / 'config.yaml'} has {data.classes}.")
    _check_partition(run_dir / "partition.csv", data)
    if cfg.strategy.name == "local":
        arrays = ArrayRecord(ckpt["state_dict"])
        states = {c: client_state(arrays, c) for c in range(data.num_clients)}
    else:
        states = {None: ckpt["state_dict"]}
    return ProbedRun(run_dir, cfg, data, checkpoint, int(ckpt["round"]), states, unfinished)


def _read_config(path: Path, data_root: Path | None) -> tuple[DataConfig, RunConfig]:
    try:
        resolved: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlSimError(f"{path} not found: {path.parent} is not a run folder of `fl-sim run` "
                         "(it writes config.yaml first).") from None
    except yaml.YAMLError as err:
        raise FlSimError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(resolved, dict) or not {"data", "run_config"} <= resolved.keys():
        raise FlSimError(f"{path} lacks the `data` and `run_config` mappings that `fl-sim run` "
                         "writes: not a run's config.")
    data = dict(resolved["data"])
    if data_root is not None:
        data["root"] = str(Path(data_root).expanduser().absolute())
    try:
        return DataConfig.model_validate(data), RunConfig.model_validate(resolved["run_config"])
    except ValidationError as err:
        raise FlSimError(f"{path} is not a valid run config:\n"
                         f"{format_validation_error(err)}") from None


def _check_partition(path: Path, data: FederatedData) -> None:
    """The rebuilt partition must be the run's: else a probe's 'client 0' is another hospital."""
    try:
        saved = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FlSimError(f"{path} not found: the probe checks the rebuilt data against the "
                         "partition the run used, and cannot without it.") from None
    rebuilt = data.manifest[MANIFEST_COLUMNS].astype(str).reset_index(drop=True)
    if list(saved.columns) == MANIFEST_COLUMNS and len(saved) == len(rebuilt):
        changed = int((saved != rebuilt).any(axis=1).sum())
        if not changed:
            return
        differ = f"{changed} of {len(saved)} images differ"
    else:
        differ = f"it holds {len(saved)} images, the rebuilt data {len(rebuilt)}"
    raise FlSimError(f"the data rebuilt from config.yaml does not match {path} ({differ}): "
                     "another copy or version of the dataset than the run's. Point --data-root "
                     "to the copy the run used.")
