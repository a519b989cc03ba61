"""The ClientApp: local training and local evaluation of the global model.

The run's settings travel in the message's ConfigRecord (`data-config`, `run-config`, as
JSON), so the same ClientApp runs in simulation and on a real SuperNode. The node's own
config may name its partition (`partition-id`) and its local data (`data-root`).
"""

from __future__ import annotations

import copy
import functools
import time
from collections import OrderedDict
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.adversary import (
    SAT_OUT, alie_shards, flip_labels, hostile_clients, poisoned_reply, sitting_out,
)
from fl_sim.arrays import is_packed, pack, to_state_dict
from fl_sim.client import fedbn, scaffold
from fl_sim.client.node_state import KeptOptimizer
from fl_sim.client.personal import load_own_part, personal_model, train_personalized
from fl_sim.client.recipe import federation_counts
from fl_sim.client.secure_aggregation import secure_aggregation_mod
from fl_sim.client.train import optimizer_kwargs, train_local
from fl_sim.client.train_split import (
    client_synthesis, own_class_counts, synthesis_report, train_split,
)
from fl_sim.config import PERSONALIZED, DataConfig, GlobalTestConfig, PartitionConfig, RunConfig
from fl_sim.data_partition import FederatedData
from fl_sim.errors import ClientFailure, FlSimError
from fl_sim.evaluation import evaluate_splits, split_predictions
from fl_sim.models.finetune import load_weights, travelling_state
from fl_sim.predictions import PERSONAL, SplitStore
from fl_sim.privacy.central import NORM_BIT, clip_update, wants_clipping
from fl_sim.task import client_rng, device, load_data, load_model, model_frozen_digest
from fl_sim.wire import CLIENT_STORE

app = ClientApp()


def _named(handler):
    """Prefix a failure with the client's partition id: the server sees only the reason text."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            client = context.node_config.get("partition-id", "?")
            raise ClientFailure(f"client {client}: {type(err).__name__}: {err}") from err

    return wrapper


def node_data_config(study_data: DataConfig, node_config: dict) -> tuple[DataConfig, int]:
    """The data this node trains on and which of its partitions: the study's partition
    `partition-id` of the node's copy (`data-root`), or with `local-data` all of the node's
    own dataset, split train/val/test by lesion, nothing held out for the server."""
    cfg = study_data.model_copy(deep=True)
    if "data-root" in node_config:
        cfg.root = str(node_config["data-root"])
    if is_local_data(node_config):
        cfg.partition = PartitionConfig(method="random", num_clients=1, seed=cfg.partition.seed,
                                        splits=cfg.partition.splits)
        cfg.global_test = GlobalTestConfig(source="none")
        cfg.max_images = None
        return cfg, 0
    return cfg, int(node_config["partition-id"])


def is_local_data(node_config: dict) -> bool:
    return str(node_config.get("local-data", "false")).lower() in ("true", "1")


def check_partition(data: FederatedData, server_digest: str, cfg: DataConfig) -> None:
    """A node that partitions its own copy of the dataset must get the server's partition:
    else it could train on images the server holds out as its test set."""
    if data.digest != server_digest:
        raise RuntimeError(
            f"this node's partition of its data copy ({cfg.root}) differs from the server's "
            f"(digest {data.digest}, server {server_digest}): another metadata file, other "
            "images or other data settings. Give the node the server's copy of the dataset "
            "(--data-root), or run it with its own data only (--local-data).")


def check_frozen(server_digest: str, own_digest: str) -> None:
    """Partial fine-tuning sends only the trainable tensors: the frozen rest must be the
    server's, built from the same weights."""
    if server_digest != own_digest:
        raise FlSimError(
            f"this node's frozen weights differ from the server's (digest {own_digest or 'none'}, "
            f"server {server_digest or 'none'}): with finetune.trainable the frozen part is never "
            "sent, so every node must build the same pretrained weights (the same weights file, "
            "timm and fl-sim versions).")


def _node_data(msg: Message, context: Context):
    """The message's settings and this node's data: (config, run_cfg, data_cfg, data,
    partition, partition id). `partition` indexes this node's data; the client id it
    reports is its partition-id."""
    config: ConfigRecord = msg.content["config"]
    study_data = DataConfig.model_validate_json(str(config["data-config"]))
    data_cfg, partition = node_data_config(study_data, context.node_config)
    run_cfg = RunConfig.model_validate_json(str(config["run-config"]))
    data = load_data(data_cfg.model_dump_json())
    if not is_local_data(context.node_config):
        check_partition(data, str(config.get("partition-digest", data.digest)), data_cfg)
    return config, run_cfg, data_cfg, data, partition, int(context.node_config["partition-id"])


def _setup(msg: Message, context: Context, own_layers: bool = True):
    """_node_data, and the model with the message's weights (and, FedBN, its own layers
    unless not `own_layers`: another site's model is evaluated as it came)."""
    config, run_cfg, data_cfg, data, partition, pid = _node_data(msg, context)
    run_json = str(config["run-config"])
    model, preprocess = load_model(run_json, tuple(data.class_names), data.images.shape[1])
    check_frozen(str(config.get("frozen-digest", "")),
                 model_frozen_digest(run_json, tuple(data.class_names), data.images.shape[1]))
    load_weights(model, scaffold.split(to_state_dict(msg.content["arrays"]))[0])
    if run_cfg.strategy.name == "fedbn" and own_layers:
        fedbn.load_own(model, context.state, run_json)
    load_own_part(model, context.state, run_cfg, run_json)  # FedPer / FedRep: its own head
    return config, run_cfg, data_cfg, data, model, preprocess, partition, pid


def _kept(config: ConfigRecord, pid: int, model: str = "") -> SplitStore | None:
    """Where this client keeps its test split's predictions of the message's model: the
    folder a simulation names for it (CLIENT_STORE, on the disk every simulated client
    shares with the server); None in a deployment."""
    if CLIENT_STORE not in config:
        return None
    return SplitStore(Path(str(config[CLIENT_STORE])) / str(pid), int(config["server-round"]),
                      model)


def _reply(msg: Message, partition_id: int, num_examples: int, metrics: dict,
           arrays: ArrayRecord | None = None) -> Message:
    # `num-examples` and `unit-weight` are both always sent: the strategy weights by one of
    # them (example-weighted or the paper's uniform eq. 3) and checks that every reply has it.
    record = MetricRecord({"num-examples": num_examples, "unit-weight": 1.0,
                           "partition-id": partition_id, **metrics})
    content = RecordDict({"metrics": record} if arrays is None else {"arrays": arrays, "metrics": record})
    return Message(content=content, reply_to=msg)


@app.train(mods=[secure_aggregation_mod])  # it acts on SecAgg+ rounds only
@_named
def train(msg: Message, context: Context) -> Message:
    config, run_cfg, data_cfg, data, model, preprocess, partition, pid = _setup(msg, context)
    server_round = int(config["server-round"])
    if run_cfg.availability and pid in sitting_out(run_cfg.availability, run_cfg.seed,
                                                   server_round, data.num_clients):
        return _reply(msg, pid, 0, {SAT_OUT: 1.0})
    adversary = run_cfg.adversary
    if adversary and pid not in hostile_clients(adversary, data.num_clients, run_cfg.seed):
        adversary = None
    attack_rng = client_rng(run_cfg.seed, pid, server_round, stream=4)
    images, labels, indices = train_split(data, [partition], run_cfg, data_cfg, preprocess.device)
    if adversary and adversary.attack == "label_flip":
        labels = flip_labels(labels, indices, len(data.classes), adversary.resolved_strength,
                             attack_rng)
    lr = float(config["lr"]) if "lr" in config else optimizer_kwargs(run_cfg.optimizer)["lr"]
    control = None
    if run_cfg.strategy.name == "scaffold":
        server_control = scaffold.split(to_state_dict(msg.content["arrays"]))[1]
        control = scaffold.ClientControl(model, server_control, context.state,
                                         str(config["run-config"]))

    run_json = str(config["run-config"])
    kept = KeptOptimizer(context.state, run_json) if run_cfg.client_state == "keep" else None

    def fit(rows, net=model, cfg=run_cfg, stream=0, **options):
        options = {"proximal_mu": float(config.get("proximal-mu", 0.0)), **options}
        return train_local(
            net, images, labels, rows, preprocess, cfg,
            rng=client_rng(run_cfg.seed, pid, server_round, stream=stream), lr=lr,
            gradient_correction=control.correction() if control else None, kept=kept,
            federation_counts=federation_counts(config), **options)

    start = time.perf_counter()
    estimates = []
    if adversary and adversary.attack == "alie":  # models on shares of its data, no honest one
        initial = copy.deepcopy(model.state_dict())
        for shard in alie_shards(indices, attack_rng):
            model.load_state_dict(initial)
            result = fit(shard)
            estimates.append(copy.deepcopy(travelling_state(model)))
    elif run_cfg.strategy.name in PERSONALIZED:
        result = train_personalized(model, functools.partial(fit, indices), context.state,
                                    run_cfg, run_json)
    else:
        result = fit(indices)
    result["train_time_s"] = time.perf_counter() - start
    if run_cfg.strategy.name == "fedbn":
        fedbn.keep_own(model, context.state, run_json)
    trained = travelling_state(model)  # the trainable part only, under finetune
    sent = scaffold.split(to_state_dict(msg.content["arrays"]))[0]
    if wants_clipping(config):  # client-level DP, clipped here (privacy.client_level.clipping)
        trained, was_clipped = clip_update(sent, trained, config)
        if run_cfg.privacy.client_level.adaptive:  # the count that moves the norm
            result[NORM_BIT] = float(was_clipped)
    if adversary:  # a hostile client clips nothing
        trained = poisoned_reply(sent, trained, [name for name, p in model.named_parameters()
                                                 if p.requires_grad and name in trained],
                                 adversary, attack_rng, estimates)
    # SCAFFOLD's Δc_i beside the weights.
    arrays = ArrayRecord(OrderedDict([*trained.items(), *(
        control.finish(model, result["steps"], lr).items() if control else ())]))
    if is_packed(msg.content["arrays"]):  # a deployed server's wire format: reply in kind
        arrays = pack(arrays)
    # Weighted by its own images: generated ones (synthesis) add no weight in aggregation.
    return _reply(msg, pid, len(data.indices(partition, "train")), result, arrays)


@app.evaluate()
@_named
def evaluate_global(msg: Message, context: Context) -> Message:
    """The global model on this client's val and test splits (keys `val_*`, `test_*`; under
    FedPer/FedRep with the client's own head); Ditto's personal model beside it
    (`personal_val_*`, `personal_test_*`, with the paired test against the global model)."""
    config, run_cfg, _, data, model, preprocess, partition, pid = _setup(msg, context)
    metrics = evaluate_splits(model, data, partition, preprocess, run_cfg.eval_batch_size,
                              keep=_kept(config, pid))
    if run_cfg.strategy.name == "ditto":
        global_probs, _ = split_predictions(model, data, partition, "test", preprocess,
                                            run_cfg.eval_batch_size)
        personal = personal_model(model, context.state, str(config["run-config"]))
        metrics.update({f"personal_{k}": v for k, v in evaluate_splits(
            personal, data, partition, preprocess, run_cfg.eval_batch_size,
            baseline=global_probs, keep=_kept(config, pid, PERSONAL)).items()})
    return _reply(msg, pid, int(metrics["val_n"]), metrics)


@app.query("personalize")
@_named
def personalize(msg: Message, context: Context) -> Message:
    """The message's global model fine-tuned on this client's own train split for
    `personalize.fine_tune_epochs` epochs (or `steps`), at `personalize.lr` (default: the
    last round's rate), with `personalize.optimizer` (default: the run's); its `val_*` / `test_*`
    metrics, with the paired test against the global model on the test split (computed
    here: the split's predictions stay here). The personalized weights stay here too,
    unless the message asks for them (`send-model`: cross-site evaluation)."""
    config, run_cfg, data_cfg, data, model, preprocess, partition, pid = _setup(msg, context)
    global_probs, _ = split_predictions(model, data, partition, "test", preprocess,
                                        run_cfg.eval_batch_size)
    images, labels, indices = train_split(data, [partition], run_cfg, data_cfg, preprocess.device)
    tune = run_cfg.personalize
    lr = tune.lr if tune.lr is not None else float(config["lr"]) if "lr" in config else None
    train_local(model, images, labels, indices, preprocess,
                run_cfg.model_copy(update={"local_epochs": tune.fine_tune_epochs,
                                           "local_steps": tune.steps,
                                           "optimizer": tune.optimizer or run_cfg.optimizer}),
                rng=client_rng(run_cfg.seed, pid, int(config["server-round"]), stream=2),
                lr=lr, federation_counts=federation_counts(config))
    metrics = evaluate_splits(model, data, partition, preprocess, run_cfg.eval_batch_size,
                              baseline=global_probs, keep=_kept(config, pid, PERSONAL))
    arrays = None
    if config.get("send-model", False):
        arrays = ArrayRecord(travelling_state(model))
        if is_packed(msg.content["arrays"]):
            arrays = pack(arrays)
    return _reply(msg, pid, int(metrics["val_n"]), metrics, arrays)


@app.query("cross_evaluate")
@_named
def cross_evaluate(msg: Message, context: Context) -> Message:
    """Another site's model (as it came: FedBN's own layers are that site's) on this
    client's test split (`test_*`, with intervals)."""
    _, run_cfg, _, data, model, preprocess, partition, pid = _setup(msg, context,
                                                                    own_layers=False)
    metrics = evaluate_splits(model, data, partition, preprocess, run_cfg.eval_batch_size,
                              splits=("test",))
    return _reply(msg, pid, int(metrics["test_n"]), metrics)


@app.query("class_counts")
@_named
def class_counts(msg: Message, context: Context) -> Message:
    """This client's train split's class counts (`class-counts`), for the federation's class
    weights (loss.class_weights: federation); only the counts leave the client."""
    _, _, _, data, partition, pid = _node_data(msg, context)
    return _reply(msg, pid, len(data.indices(partition, "train")),
                  {"class-counts": own_class_counts(data, partition).tolist()})


@app.query("synthesize")
@_named
def synthesize(msg: Message, context: Context) -> Message:
    """Rare-class synthesis before round 1: this client's GAN trains on its own train split
    (or its images come from the client's cache). Only the cost, the counts and a small
    sample grid per class are sent back, for the run's summary and TensorBoard."""
    _, run_cfg, data_cfg, data, partition, pid = _node_data(msg, context)
    made = client_synthesis(data, partition, run_cfg, data_cfg, device())
    metrics, grid = synthesis_report(made, data.classes)
    samples = None if grid is None else ArrayRecord({"samples": Array(grid)})
    return _reply(msg, pid, len(made.labels), metrics, samples)
